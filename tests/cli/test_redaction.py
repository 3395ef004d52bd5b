"""A password in the tracking URI is masked in the config echo and in `serve --print-config`."""

from __future__ import annotations

from samtone_ray.cli import main
from samtone_ray.cli.args import echo
from samtone_ray.core.config import load_config

SECRET = "s3cret-pw"


def test_the_resolved_config_echo_masks_the_password(capsys):
    echo(load_config(None, [f"tracking.uri=http://alice:{SECRET}@mlflow.example:5000",
                            f"data.train=https://bob:{SECRET}@data.example/beir"]))
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "uri: http://alice:***@mlflow.example:5000" in out and "train: https://bob:***@data.example/beir" in out


def test_print_config_masks_the_password_of_the_tracking_uri(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@mlflow.example:5000")
    assert main(["serve", "--print-config", "--model", "models:/m@champion"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "http://alice:***@mlflow.example:5000" in out
