"""A model directory's own files cannot point a loader outside it."""

from __future__ import annotations

import json

import pytest

from samtone_ray.core.files import path_inside
from samtone_ray.model.towers import DualEncoder


def test_a_modules_json_pointing_outside_the_model_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "../../etc", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules.json module 0: path '../../etc' leads outside"):
        DualEncoder.from_pretrained(model)


@pytest.mark.parametrize("relative", ["../x", "/etc", "a/../../x", "link/passwd"])
def test_paths_leading_out_are_refused_and_paths_inside_kept(tmp_path, relative):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "link").symlink_to("/etc")
    assert path_inside(root, "a", source="f") == (root / "a").resolve()
    assert path_inside(root, "a/../a", source="f") == (root / "a").resolve()
    with pytest.raises(ValueError, match="f: path .* leads outside"):
        path_inside(root, relative, source="f")
