"""Where a tuning run keeps its files on disk: one definition for the tuner, its leaderboard and the CLI.

    <output_dir>/tune.json                  the config and the MLflow parent run (what --resume reads;
                                            search.json in studies from before the rename)
    <output_dir>/leaderboard.csv|png
    <output_dir>/configurations.csv          the leaderboard by configuration, over seeds (tune.seeds > 1)
    <output_dir>/ray.log                     Ray's own output (Tune's tables, Ray's logs, the workers' stdout/stderr)
    <output_dir>/tune/                       Ray Tune's experiment (trial folders named by trial id)
    <output_dir>/trials/<trial id>/          one trial: config.json (its resolved config), model/, mlflow_run_id,
                                            per_query.parquet, ray/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samtone_ray.core.config import Config, from_dict, migrate_sections
from samtone_ray.evaluation.per_query import PER_QUERY_FILE

STATE_FILE = "tune.json"
LEGACY_STATE_FILE = "search.json"
"""The state file's name before tuning was called "tune": read by --resume when tune.json is absent."""
TUNE_NAME = "tune"  # Tune's RunConfig name: its experiment folder under output_dir


@dataclass(frozen=True)
class TrialLayout:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"  # the trial's resolved config, written once as it starts

    @property
    def model(self) -> Path:
        return self.dir / "model"  # written by training when the trial trained to its last step

    @property
    def run_id_file(self) -> Path:
        return self.dir / "mlflow_run_id"

    @property
    def per_query(self) -> Path:
        return self.dir / PER_QUERY_FILE  # per-query metrics of the trial's latest evaluation

    @property
    def ray_storage(self) -> Path:
        return self.dir / "ray"  # Ray Train's checkpoints, so a restarted trial resumes

    def run_id(self) -> str | None:
        return self.run_id_file.read_text().strip() if self.run_id_file.exists() else None

    def read_config(self) -> Config | None:
        """The config the trial trained with; None before it started."""
        if not self.config.exists():
            return None
        return from_dict(json.loads(self.config.read_text()), source=self.config)


@dataclass(frozen=True)
class TuneLayout:
    root: Path

    @property
    def state(self) -> Path:
        """Where the state is written."""
        return self.root / STATE_FILE

    @property
    def saved_state(self) -> Path:
        """Where the state is read from: ``tune.json``, else a study's older ``search.json`` when
        only that exists (the next write goes to ``tune.json``)."""
        legacy = self.root / LEGACY_STATE_FILE
        return legacy if not self.state.exists() and legacy.exists() else self.state

    def read_state(self) -> dict[str, Any]:
        """The saved state, its config's sections under their current names (see ``migrate_sections``)."""
        path = self.saved_state
        state = json.loads(path.read_text())
        state["config"] = migrate_sections(state["config"], path)
        return state

    @property
    def leaderboard_csv(self) -> Path:
        return self.root / "leaderboard.csv"

    @property
    def configurations_csv(self) -> Path:
        return self.root / "configurations.csv"  # by configuration, over seeds (tune.seeds > 1)

    @property
    def leaderboard_png(self) -> Path:
        return self.root / "leaderboard.png"

    @property
    def ray_log(self) -> Path:
        """Where ``samtone tune`` sends Ray's output unless ``--verbose`` (``tune.progress.RayOutput``)."""
        return self.root / "ray.log"

    @property
    def tune_dir(self) -> Path:
        return self.root / TUNE_NAME

    def trial(self, trial_id: str) -> TrialLayout:
        return TrialLayout(self.root / "trials" / str(trial_id))

    def tune_results(self, trial_id: str) -> Path:
        """Tune's record of every report of a trial (one JSON object per line)."""
        return self.tune_dir / str(trial_id) / "result.json"
