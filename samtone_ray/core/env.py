"""Process-wide defaults that must be set before Ray, MLflow or Hugging Face are imported."""

from __future__ import annotations

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # models come from local paths; nothing downloads at run time
    "TOKENIZERS_PARALLELISM": "false",  # tokenisation runs on our own prefetch thread
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def apply_defaults() -> None:
    """Set the defaults above unless the user set them; a local Ray cluster stays on loopback."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
