"""Model URIs -> a local model directory, the registry version behind it and a content fingerprint.

Serving, re-encoding and indexing all take the same ``--model`` forms:

* ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` (the MLflow registry),
* ``runs:/RUN_ID/model`` (a run's logged model),
* a local model directory (saved by samtone, a sentence-transformers or a plain HF model), or the
  bundled alias ``all-MiniLM-L6-v2``.

Only files are read: the samtone model directory inside the logged pyfunc model (the one
``tracking.RunLogger.log_model`` stores as its ``model`` artifact). Nothing is unpickled and no
code from the artifact store runs. ``fingerprint`` hashes the weight files, so two URIs naming the
same weights agree and an index built by one model version is recognisable as such.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from samtone_ray.core.files import path_inside

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_PYFUNC_ARTIFACT = "model"  # the key RunLogger.log_model gives the model directory


RUN_MODEL_PATH = "model"  # the artifact path RunLogger.log_model logs a run's model under


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def version_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def run_model_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{RUN_MODEL_PATH}"


def is_registry_uri(uri: str) -> bool:
    """A ``models:/`` URI: what it names can change (a new version, a moved alias)."""
    return uri.startswith("models:/")


class ModelURIError(ValueError):
    """A model URI that names nothing loadable; the message says which part is wrong."""


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as given by the user
    path: Path  # local model directory, loadable with DualEncoder.from_pretrained
    name: str | None = None  # registered model name (models:/ URIs)
    version: str | None = None  # registry version (models:/ URIs)
    run_id: str | None = None
    fingerprint: str = ""  # sha256 (16 hex) of the weight files' contents

    @property
    def label(self) -> str:
        """Human-readable identity: ``NAME/vVERSION``, ``run RUN_ID`` or the directory name."""
        if self.name and self.version:
            return f"{self.name}/v{self.version}"
        if self.run_id:
            return f"run {self.run_id}"
        return self.path.name

    def as_dict(self) -> dict[str, str | None]:
        return {
            "uri": self.uri,
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "fingerprint": self.fingerprint,
        }


def resolve_model(uri: str, tracking_uri: str | None = None, *, download_dir: str | Path | None = None) -> ResolvedModel:
    """Resolve ``uri`` to a local directory (downloading registry/run artifacts when they are not
    on a local filesystem; into ``download_dir``, else once per machine into ``model_cache_dir()``)."""
    if is_registry_uri(uri):
        return _resolve_registered(uri, tracking_uri, download_dir)
    if uri.startswith("runs:/"):
        return _resolve_run(uri, tracking_uri, download_dir)
    from samtone_ray.model.layout import resolve_model_path

    path = Path(resolve_model_path(uri))
    if not path.is_dir():
        raise ModelURIError(
            f"model {uri!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
            "nor an existing local directory"
        )
    return ResolvedModel(uri=uri, path=path.resolve(), fingerprint=fingerprint(path))


def _parse_registered(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    elif rest.count("/") == 1:
        name, version = rest.split("/")
        if name and version.isdigit():
            return name, None, version
    raise ModelURIError(f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION (VERSION a number)")


def _resolve_registered(uri: str, tracking_uri: str | None, download_dir) -> ResolvedModel:
    from samtone_ray.tracking import runs as tracking

    name, alias, version = _parse_registered(uri)
    tracking_uri = tracking.tracking_uri(tracking_uri or "")
    c = tracking.client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except Exception as exc:  # MLflow raises RestException / MlflowException subclasses
        what = f"alias @{alias}" if alias else f"version {version}"
        raise ModelURIError(f"model URI {uri!r}: registered model {name!r} has no {what} ({exc})") from exc
    root = _local_artifacts(mv.source, download_dir, tracking_uri)
    path = _model_dir(root, uri)
    return ResolvedModel(uri, path, name=name, version=str(mv.version), run_id=mv.run_id, fingerprint=fingerprint(path))


def _resolve_run(uri: str, tracking_uri: str | None, download_dir) -> ResolvedModel:
    from samtone_ray.tracking import runs as tracking

    parts = uri[len("runs:/") :].strip("/").split("/", 1)
    if len(parts) != 2 or not parts[0]:
        raise ModelURIError(f"model URI {uri!r}: expected runs:/RUN_ID/ARTIFACT_PATH (e.g. runs:/<id>/model)")
    run_id, artifact = parts
    tracking_uri = tracking.tracking_uri(tracking_uri or "")
    c = tracking.client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except Exception as exc:
        raise ModelURIError(f"model URI {uri!r}: no run {run_id!r} in the tracking store ({exc})") from exc
    root = _local_artifacts(f"{run.info.artifact_uri.rstrip('/')}/{artifact}", download_dir, tracking_uri)
    path = _model_dir(root, uri)
    return ResolvedModel(uri, path, run_id=run_id, fingerprint=fingerprint(path))


def _local_artifacts(source: str, download_dir, tracking_uri: str) -> Path:
    """A local folder holding ``source``: itself when it is on this filesystem, else a download
    (into ``download_dir``, or once into ``model_cache_dir()``)."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        local = Path(unquote(parsed.path))
        if local.is_dir():
            return local
    import mlflow.artifacts

    def download(dst: Path) -> Path:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))

    if download_dir:
        Path(download_dir).mkdir(parents=True, exist_ok=True)
        return download(Path(download_dir))
    # A run's files do not change: each source is downloaded once per machine, not at every
    # resolution (a serving replica resolves its alias at every poll).
    cache = model_cache_dir()
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    done = cache / hashlib.sha256(f"{tracking_uri}\n{source}".encode()).hexdigest()[:32]
    if not done.is_dir():
        part = Path(tempfile.mkdtemp(prefix=".part-", dir=cache))
        download(part)
        try:
            part.rename(done)  # whole or not at all
        except OSError:  # another process finished the same download first
            if not done.is_dir():
                raise
            shutil.rmtree(part, ignore_errors=True)
    (root,) = done.iterdir()  # download_artifacts puts the artifact (a folder) inside dst
    return root


def model_cache_dir() -> Path:
    """Where models downloaded from a tracking server are kept: ``$SAMTONE_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/samtone/models`` (``~/.cache/samtone/models``)."""
    if os.environ.get("SAMTONE_MODEL_CACHE"):
        return Path(os.environ["SAMTONE_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "samtone" / "models"


def _model_dir(root: Path, uri: str) -> Path:
    """The samtone model directory inside a logged pyfunc model (or ``root`` if it is one)."""
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        if (root / "config.json").is_file() or (root / "modules.json").is_file():
            return root
        raise ModelURIError(f"model URI {uri!r}: {root} holds neither an MLflow model (MLmodel) nor a model directory")
    import yaml

    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(_PYFUNC_ARTIFACT)
    if not entry or "path" not in entry:
        raise ModelURIError(f"model URI {uri!r}: {mlmodel} has no '{_PYFUNC_ARTIFACT}' artifact; it was not logged by samtone")
    try:
        path = path_inside(root, str(entry["path"]), source=f"{mlmodel} artifacts.{_PYFUNC_ARTIFACT}.path")
    except ValueError as exc:
        raise ModelURIError(f"model URI {uri!r}: {exc}") from None
    if not path.is_dir():
        raise ModelURIError(f"model URI {uri!r}: the model artifact {path} is missing")
    return path


def fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of the weight files under ``path``, by relative name and content."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
