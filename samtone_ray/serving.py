"""Deprecated import path, kept for one release: ``samtone_ray.serving:build_app``.

Serve configs written before 0.2 (``jobs/serve.yaml``, KubeRay RayService manifests) name this
module as their ``import_path``; the application now lives in :mod:`samtone_ray.serve.app`.
Change ``import_path`` to ``samtone_ray.serve.app:build_app``; this module goes in 0.3.
"""

import warnings

from samtone_ray.serve.app import build_app  # noqa: F401

warnings.warn(
    "samtone_ray.serving is deprecated and goes in samtone-ray 0.3: set the Serve import_path "
    "to samtone_ray.serve.app:build_app",
    FutureWarning,
    stacklevel=2,
)
