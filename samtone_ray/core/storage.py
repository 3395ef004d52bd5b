"""Where outputs go: a local folder or an object-store URI (``s3://bucket/prefix``, ``gs://...``,
``hdfs://...``: whatever ``pyarrow.fs`` opens), behind one small interface so every writer treats
both alike.

Endpoint and credentials come from the store's standard environment on each node, never from a
URI or a config file (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``); nothing here prints or logs them, and
errors name the URI with any credential masked.

Atomicity: a local file is written beside its target and renamed over it; an object is written by one
upload that becomes visible only when complete. Either way a reader (or a crash) sees the old file or
the new one, never a part. Object stores have no rename, so ``write_bytes`` is the only commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samtone_ray.core.redact import has_credentials, redact_uri

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """An output location that cannot be used; the message names it (credentials masked)."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names remote storage (``scheme://...``) rather than a local path.
    ``file://`` is local."""
    match = _SCHEME.match(os.fspath(location))
    return bool(match) and match["scheme"].lower() != "file"


def normalize(location: str | os.PathLike[str]) -> str:
    """A local path made absolute (``file://`` stripped), or a URI without its trailing slash.
    A URI without a bucket / host (``s3://``, ``s3:///x``) is refused, naming it."""
    text = os.fspath(location)
    if not text:
        raise StorageError("an empty output location")
    if is_uri(text):
        if has_credentials(text):  # pyarrow takes s3://KEY:SECRET@bucket and ?secret_key=: never from here
            raise StorageError(
                f"{redact_uri(text)} carries a credential, which would be shown and stored wherever the location "
                "is; give the URI without it and the credentials in the environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, ... on every node)"
            )
        scheme, rest = text.split("://", 1)
        if not rest.split("/", 1)[0]:
            raise StorageError(f"{redact_uri(text)}: no bucket or host after {scheme}://")
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    if _SCHEME.match(text):  # file://
        text = text.split("://", 1)[1]
    return str(Path(text).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location`` / ``parts``: a URI joined with ``/``, a local path with the OS separator."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def open_parent(location: str | os.PathLike[str]) -> tuple[Store, str]:
    """The ``Store`` of the folder holding file ``location``, and the file's name in it."""
    where = normalize(location)
    folder, _, name = where.rpartition("/")
    return open_store(folder), name


def open_store(location: str | os.PathLike[str]) -> Store:
    """The ``Store`` at ``location`` (see ``normalize``); a scheme pyarrow cannot open, or a store it
    cannot reach, is refused naming the location."""
    import pyarrow.fs as pafs

    where = normalize(location)
    if not is_uri(where):
        return Store(where, pafs.LocalFileSystem(), where)
    try:
        fs, root = pafs.FileSystem.from_uri(where)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:  # ArrowInvalid, ArrowNotImplementedError
        raise StorageError(f"{redact_uri(where)}: cannot open this storage ({_clean(exc)})") from None
    return Store(where, fs, root.rstrip("/"))


def _clean(exc: BaseException) -> str:
    return redact_uri(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


@dataclass(frozen=True)
class Store:
    """A folder on local or remote storage. Paths are relative to it, ``/``-separated."""

    location: str  # as normalize() gives it: what users see and configs hold
    fs: Any  # pyarrow.fs.FileSystem
    root: str  # ``location`` within ``fs``

    @property
    def remote(self) -> bool:
        return is_uri(self.location)

    def url(self, rel: str = "") -> str:
        """``rel`` as users name it (an absolute path or a URI)."""
        return join(self.location, rel) if rel else self.location

    def child(self, rel: str) -> Store:
        return Store(self.url(rel), self.fs, self._path(rel))

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel.strip('/')}" if rel else self.root

    @contextlib.contextmanager
    def _errors(self, what: str, rel: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{redact_uri(self.url(rel))}: {what} failed ({_clean(exc)})") from None

    def _info(self, rel: str):
        with self._errors("looking up", rel):
            return self.fs.get_file_info(self._path(rel))

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def names(self, rel: str = "") -> list[str]:
        """The entries directly in folder ``rel`` (sorted); none when it does not exist."""
        import pyarrow.fs as pafs

        with self._errors("listing", rel):
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def size(self, rel: str) -> int:
        return self._info(rel).size

    def read_bytes(self, rel: str) -> bytes:
        if not self.is_file(rel):
            raise FileNotFoundError(f"{redact_uri(self.url(rel))}: no such file")
        with self._errors("reading", rel), self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def open_input(self, rel: str):
        """A random-access reader of file ``rel`` (for Parquet: its footer without the whole file)."""
        if not self.is_file(rel):
            raise FileNotFoundError(f"{redact_uri(self.url(rel))}: no such file")
        with self._errors("opening", rel):
            return self.fs.open_input_file(self._path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically (see the module docstring)."""
        if not self.remote:
            from samtone_ray.core.files import atomic_write_bytes

            with self._errors("writing", rel):
                atomic_write_bytes(Path(self._path(rel)), data)
            return
        with self._errors("writing", rel), self.fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, payload: Any) -> None:
        self.write_text(rel, json.dumps(payload, indent=1))

    def makedirs(self, rel: str = "") -> None:
        with self._errors("creating", rel):
            self.fs.create_dir(self._path(rel), recursive=True)

    def delete(self, rel: str) -> None:
        """Remove file or folder ``rel``; absent is fine."""
        import pyarrow.fs as pafs

        info = self._info(rel)
        with self._errors("deleting", rel):
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self._path(rel))
            elif info.type != pafs.FileType.NotFound:
                self.fs.delete_file(self._path(rel))

    def upload(self, local_dir: str | os.PathLike[str], rel: str) -> None:
        """Copy the local folder ``local_dir`` to ``rel`` (each file whole; see ``write_bytes``)."""
        import pyarrow.fs as pafs

        with self._errors("uploading to", rel):
            pafs.copy_files(str(Path(local_dir).resolve()), self._path(rel), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

    def download(self, rel: str, local_dir: str | os.PathLike[str]) -> None:
        """Copy folder ``rel`` into the local folder ``local_dir``."""
        import pyarrow.fs as pafs

        with self._errors("downloading", rel):
            pafs.copy_files(self._path(rel), str(Path(local_dir).resolve()), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
