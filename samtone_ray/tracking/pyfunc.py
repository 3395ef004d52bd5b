"""The MLflow pyfunc wrapper of a saved DualEncoder: ``predict(texts) -> embeddings``.

The model travels as plain files (safetensors + configs) in the artifact ``model``. The logged
``python_model.pkl`` holds only a reference to this class (``samtone_ray.tracking.pyfunc.
DualEncoderPyfunc``, an instance without state, pickled by reference), so loading imports the
installed ``samtone_ray`` (pinned in the model's requirements) and runs no code from the
artifact store. ``params={"tower": "query"}`` selects the query tower (default: documents).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class DualEncoderPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from samtone_ray.model.towers import DualEncoder

        self.encoder = DualEncoder.from_pretrained(context.artifacts["model"])
        self.encoder.eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        texts = _texts(model_input)
        tower = (params or {}).get("tower", "document")
        if tower == "query":
            return self.encoder.encode_queries(texts).numpy()
        if tower in ("document", "doc"):
            return self.encoder.encode_documents(texts).numpy()
        raise ValueError(f"params.tower must be 'query' or 'document', got {tower!r}")


def _texts(model_input) -> list[str]:
    """Accept a list of strings, a 1-column DataFrame or a Series."""
    if hasattr(model_input, "columns"):
        if len(model_input.columns) != 1:
            raise ValueError(f"expected one text column, got {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    return [str(t) for t in list(model_input)]

