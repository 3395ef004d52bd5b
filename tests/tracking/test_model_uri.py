"""Model URIs are built and parsed only in tracking/model_uri.py: what the builders write, the
parser reads back. (Resolving URIs against a real registry: test_runs.py.)"""

import pytest

from samtone_ray.tracking.model_uri import _parse_registered, alias_uri, is_registry_uri, run_model_uri, version_uri


@pytest.mark.parametrize("name, ref", [("samtone", "champion"), ("debian-v2", 7)])
def test_built_model_uris_parse_back(name, ref):
    """Model URIs are built and parsed only here; what the builders write the parser reads."""
    if isinstance(ref, str):
        uri = alias_uri(name, ref)
        assert _parse_registered(uri) == (name, ref, None)
    else:
        uri = version_uri(name, ref)
        assert _parse_registered(uri) == (name, None, str(ref))
    assert is_registry_uri(uri) and not is_registry_uri(run_model_uri("abc"))
    assert run_model_uri("abc") == "runs:/abc/model"
