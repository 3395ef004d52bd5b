"""Atomic writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside ``path``, fsync, then rename over it (rename is atomic within a filesystem).
    The temp file is removed if anything fails, so no stray ``.tmp`` files pile up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # os.open (not mkstemp, which makes 0600 files) so the file gets the usual umask-based mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` on a fresh sibling directory of ``target``, fsync it, then swap it in.

    On Linux an existing ``target`` is exchanged with the staging directory in one
    ``renameat2(RENAME_EXCHANGE)``, so a reader always finds either the old or the new
    directory, never none. Elsewhere the old one is moved aside first (a brief gap).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(staging, target)
        fsync_dir(target.parent)
        return target
    if _exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging)  # now holds the old contents
        return target
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(backup)
    return target


def path_inside(root: Path, relative: str | os.PathLike[str], *, source: str) -> Path:
    """``root / relative``, refused when it resolves outside ``root`` (``..``, an absolute path or
    a link leading out): a path read from a file (``source``, named in the error) must not make
    a loader read files elsewhere on the machine."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{source}: path {os.fspath(relative)!r} leads outside {root} (to {path}); refused")
    return path
