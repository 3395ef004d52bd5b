"""A password in a URI is masked in the config echo and in `serve --print-config`, and refused in tracking.uri."""

from __future__ import annotations

import pytest

from samtone_ray.cli import main
from samtone_ray.cli.args import echo
from samtone_ray.core.config import ConfigError, load_config

SECRET = "s3cret-pw"


def test_the_resolved_config_echo_masks_the_password(capsys):
    echo(load_config(None, [f"data.train=https://bob:{SECRET}@data.example/beir",
                            f"data.eval=s3://corpora/dev?token={SECRET}"]))
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "train: https://bob:***@data.example/beir" in out and "eval: s3://corpora/dev?token=***" in out


def test_a_tracking_uri_with_a_password_is_refused_for_mlflows_own_variables():
    # The config is echoed, copied into tune.json and uploaded by submit; MLflow reads the
    # credentials from its environment instead.
    with pytest.raises(ConfigError, match=r"tracking.uri=http://alice:\*\*\*@mlflow.example:5000 carries a password "
                                          r".*MLFLOW_TRACKING_PASSWORD") as err:
        load_config(None, [f"tracking.uri=http://alice:{SECRET}@mlflow.example:5000"])
    assert SECRET not in str(err.value)


def test_print_config_masks_the_password_of_the_tracking_uri(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@mlflow.example:5000")
    assert main(["serve", "--print-config", "--model", "models:/m@champion"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "http://alice:***@mlflow.example:5000" in out
