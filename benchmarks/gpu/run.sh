#!/usr/bin/env bash
# The GPU path, end to end, on one machine with an NVIDIA GPU, in under 8 minutes:
#   1. the CUDA-only tests (tests/test_gpu.py);
#   2. a 1-GPU Ray Train run: NCCL, bf16, gradient cache, evaluation, model saved;
#   3. training throughput vs sentence-transformers MNRL at global batch 1024, EQUAL max lengths
#      (the project's 32/128 for both), bf16, plus the gradient-cache row;
#   4. encoding throughput vs SentenceTransformer.encode at equal max length (128);
#   5. peak GPU memory vs batch, plain vs gradient cache, and the largest global batch that trains
#      on this GPU with the gradient cache.
# Every stage writes JSON (and its log) to $OUT; a failed stage is recorded and the next runs.
#
# Prepare here (CPU machine, project root):  bash benchmarks/gpu/make_kit.sh
# Run there (the device tool: carry [".whl", ".gpu"]):        bash benchmarks/gpu/run.sh
# Check here that nothing is dead on arrival (CPU, tiny sizes): bash benchmarks/gpu/run.sh --dry-run
#
# Weights: .gpu/minilm-arch holds all-MiniLM-L6-v2's config and tokenizer but not its 90 MB of
# weights (they do not fit the 64 MiB carry beside Ray); random weights of that architecture are
# made there (seeded). Speed and memory do not depend on the weights' values; every system loads
# the same directory.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
OUT=${OUT:-$root/.gpu/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$SECONDS
status=0

stage() {  # stage NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$(($2 * slack))
  shift 2
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"at_s\": $((SECONDS - start))}" >>"$OUT/stages.jsonl"
  [[ $rc -eq 0 ]] || status=1
}

if [[ $dry -eq 1 ]]; then
  PY=${PYTHON:-$root/.venv/bin/python}
  [[ -x $PY ]] || PY=/work/main/.venv/bin/python
  export PYTHONPATH=$root
  model=$OUT/minilm-arch
  data=$root/samtone_ray/sample/debian
  slack=6  # a shared 2-core CPU, not a GPU
  ray_lock=(flock /tmp/samtone-ray.lock)  # the dev machine's rule for anything that starts Ray
  dev=cpu prec=fp32 b_train=32 micro=32 steps=1 rounds=1 docs=64 sizes=16,32 maxb=64 ray_b=8 ray_steps=2
else
  PY=python3
  slack=1
  ray_lock=()
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$root
  model=/tmp/minilm-arch
  data=$root/.gpu/pairs.parquet
  dev=cuda prec=bf16 b_train=1024 micro=256 steps=3 rounds=3 docs=50000 sizes=1024,4096 maxb=131072 ray_b=1024 ray_steps=20
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
fi
export SAMTONE_TOKENIZER_DIR=$root/.gpu/minilm-arch  # the tiny test BERTs' tokenizer (tests/test_gpu.py)

# The MiniLM-L6 architecture with seeded random weights (see the header).
rm -rf "$model" && cp -r "$root/.gpu/minilm-arch" "$model" && $PY benchmarks/gpu/kit.py weights "$model" || exit 1

stage cuda_tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
stage ray_train 120 "${ray_lock[@]}" $PY benchmarks/gpu/ray_train_check.py --model "$model" --out "$OUT/ray_train.json" \
  --batch-size $ray_b --micro-batch-size $((ray_b < 256 ? ray_b : 256)) --steps $ray_steps $([[ $dry -eq 1 ]] && echo --dry-run)
stage train_throughput 120 $PY benchmarks/train_throughput.py --device $dev --precision $prec --model "$model" \
  --data "$data" --batch-size $b_train --micro-batch-size $micro --steps $steps --rounds $rounds --warmup 1 \
  --out "$OUT/train_throughput.json"
stage encode_throughput 60 $PY benchmarks/gpu/encode_throughput.py --device $dev --precision $prec --model "$model" \
  --data "$data" --docs $docs --batch-size 512 --max-length 128 --rounds 3 --out "$OUT/encode_throughput.json"
stage batch_memory 180 $PY benchmarks/batch_memory.py --device $dev --precision $prec --model "$model" --data "$data" \
  --batch-sizes $sizes --micro-batch-size $micro --chunk-size $((micro < 64 ? micro : 64)) --find-max --max-batch $maxb \
  --point-timeout $((90 * slack)) --out "$OUT/batch_memory.json"

echo "total ${SECONDS}s; stages: $(tr -d '\n' <"$OUT/stages.jsonl")"
exit $status
