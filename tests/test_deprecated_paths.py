"""Import paths that deployed clusters and logged models already name keep working for one
release, and say where the code went."""

import importlib
import sys

import pytest


def _fresh_import(name: str):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_the_old_serve_import_path_still_builds_the_app_and_warns():
    from samtone_ray.serve.app import build_app

    with pytest.warns(FutureWarning, match=r"samtone_ray\.serve\.app:build_app"):
        old = _fresh_import("samtone_ray.serving")
    assert old.build_app is build_app


@pytest.mark.mlflow
def test_models_pickled_with_the_old_pyfunc_path_still_load_its_class():
    from samtone_ray.tracking.pyfunc import DualEncoderPyfunc

    with pytest.warns(FutureWarning, match="logged by samtone-ray < 0.2"):
        old = _fresh_import("samtone_ray.mlflow_model")
    assert old.DualEncoderPyfunc is DualEncoderPyfunc
