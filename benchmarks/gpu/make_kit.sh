#!/usr/bin/env bash
# Prepares what benchmarks/gpu/run.sh needs on the GPU machine, in the project root:
#   .gpu/  MiniLM-L6's architecture and tokenizer (no weights) and the training pairs as Parquet;
#   .whl/  Ray and the packages the GPU image lacks (../shared/device/kit.sh).
# Then call the device tool with carry [".whl", ".gpu"] and: bash benchmarks/gpu/run.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PY=${PYTHON:-$root/.venv/bin/python}
[[ -x $PY ]] || PY=/work/main/.venv/bin/python
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .gpu
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
PYTHONPATH=$root $PY benchmarks/gpu/kit.py files .gpu
if [[ "${1:-}" != "--no-wheels" ]]; then
  bash "$root/../shared/device/kit.sh" bm25s==0.3.16  # evaluation.py imports bm25s
fi
du -sh .gpu .whl 2>/dev/null || true
