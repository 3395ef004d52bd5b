"""Deprecated import path, kept for one release: ``samtone_ray.mlflow_model.DualEncoderPyfunc``.

Models logged before 0.2 hold a pickled reference to the pyfunc class under this name, so loading
them imports this module; the class now lives in :mod:`samtone_ray.tracking.pyfunc`. Re-register
such models (``samtone models`` lists them) before 0.3 removes this module.
"""

import warnings

from samtone_ray.tracking.pyfunc import DualEncoderPyfunc  # noqa: F401

warnings.warn(
    "samtone_ray.mlflow_model is deprecated and goes in samtone-ray 0.3: this model was logged "
    "by samtone-ray < 0.2; log it again to load it with later versions",
    FutureWarning,
    stacklevel=2,
)
