"""The configs the project ships, for the tests that check them."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# jobs/serve.yaml is a `serve deploy` config (test_serving_config.py checks it); the others are
# samtone configs.
SAMTONE_JOB_CONFIGS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if p.name != "serve.yaml")
