"""What ``samtone submit`` uploads of the working directory, decided before anything is sent.

A working directory often holds more than code: ``.env`` files, cloud and SSH credentials, local
MLflow databases, model weights. Ray uploads a ``working_dir`` whole (less ``.gitignore`` entries
and its own short list) and unpacks it on every node, where any job and anyone with access to the
nodes can read it. So the upload is planned here, file by file:

* never uploaded, by name (:func:`skip_reason`): VCS data, environments and local results
  (``IGNORED``); secrets, credentials and local databases (``SECRET_DIRS``, ``SECRET_FILES``,
  SSH keys ``id_*``); files over a size limit; links that lead out of the working directory;
* the working directory's ``.gitignore`` and ``.rayignore`` files, at every level, as Ray reads
  them;
* everything else is packed into a zip that is exactly what the cluster receives
  (:func:`write_zip`): nothing Ray decides on its own, and ``--dry-run`` prints the same list.
"""

from __future__ import annotations

import fnmatch
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# Not uploaded, not worth reporting: VCS data, environments, local runs and results, and files
# only the submitter needs (the KubeRay CRDs alone are 3 MB). Names match any path component;
# entries with a "/" match from the working directory's top.
IGNORED = (
    ".git", ".venv", "venv", ".samtone", "results", "benchmarks/results", "outputs", "mlruns", "mlartifacts",
    "deploy/kuberay/crds", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "build", "dist",
)
# Secrets, credentials and local databases: never uploaded, always reported. Matched
# case-insensitively against each path component.
SECRET_DIRS = (".aws", ".ssh", ".gnupg", ".kube", ".docker", ".azure", ".gcloud")
SECRET_FILES = (
    ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
    ".netrc", "_netrc", ".pgpass", ".npmrc", ".pypirc", ".htpasswd", "*credential*", "*secret*.json",
    "*.db", "*.db-*", "*.sqlite", "*.sqlite*",
)
# ssh-keygen's files (id_rsa, id_ed25519.pub, id_deploy): "id_" and no suffix other than .pub,
# so that code such as id_utils.py still travels.
_SSH_KEY_SUFFIXES = ("", ".pub")
DEFAULT_MAX_FILE_MB = 10.0  # Ray itself warns from 10 MiB per file
IGNORE_FILES = (".gitignore", ".rayignore")


@dataclass(frozen=True)
class Skipped:
    path: str  # relative, POSIX; a folder ends in "/"
    reason: str  # "secret" | "size" | "link"
    detail: str  # the rule that matched, or the size
    size: int = 0


@dataclass
class UploadPlan:
    root: Path
    max_file_bytes: int
    files: list[tuple[str, int]] = field(default_factory=list)  # (relative POSIX path, bytes), sorted
    skipped: list[Skipped] = field(default_factory=list)  # secrets, large files, outward links

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def largest(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(self.files, key=lambda f: (-f[1], f[0]))[:n]

    def holds(self, rel: str) -> list[Skipped]:
        """The skipped entries at or under ``rel`` (a path relative to the root), or above it."""
        rel = rel.strip("/")
        out = []
        for s in self.skipped:
            path = s.path.rstrip("/")
            if path == rel or path.startswith(rel + "/") or rel.startswith(path + "/"):
                out.append(s)
        return out

    def describe(self, n: int = 5) -> str:
        """What is uploaded and what is held back, for the terminal (no file contents)."""
        n = len(self.files)
        lines = [f"working directory {self.root}: {n} file{'' if n == 1 else 's'} to upload, {human_bytes(self.total_bytes)}"]
        if self.files:
            lines.append("  largest: " + ", ".join(f"{p} ({human_bytes(s)})" for p, s in self.largest(n)))
        labels = {
            "secret": "not uploaded (secrets, credentials, local databases)",
            "size": f"not uploaded (over the {human_bytes(self.max_file_bytes)} file limit, --max-file-mb)",
            "link": "not uploaded (links out of the working directory)",
        }
        for reason, label in labels.items():
            entries = [s for s in self.skipped if s.reason == reason]
            if entries:
                shown = ", ".join(s.path + (f" ({human_bytes(s.size)})" if reason == "size" else "") for s in entries[:20])
                more = f" and {len(entries) - 20} more" if len(entries) > 20 else ""
                lines.append(f"  {label}: {shown}{more}")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _is_ssh_key(name: str) -> bool:
    stem, suffix = os.path.splitext(name)
    return name.startswith("id_") and len(stem) > 3 and suffix in _SSH_KEY_SUFFIXES


def secret_rule(rel: str, *, is_dir: bool) -> str | None:
    """The rule by which ``rel`` (relative POSIX path) is a secret, or None."""
    name = PurePosixPath(rel).name.lower()
    if is_dir:
        return name if name in SECRET_DIRS else None
    if _is_ssh_key(name):
        return "id_* (SSH key)"
    return next((pattern for pattern in SECRET_FILES if fnmatch.fnmatchcase(name, pattern)), None)


def ignored_rule(rel: str) -> str | None:
    """The ``IGNORED`` entry that keeps ``rel`` from the upload, or None."""
    parts = PurePosixPath(rel).parts
    for pattern in IGNORED:
        if "/" in pattern:
            if rel == pattern or rel.startswith(pattern + "/"):
                return pattern
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return pattern
    return None


def skip_reason(rel: str, size: int, *, is_dir: bool, max_file_bytes: int) -> tuple[str, str] | None:
    """Why ``rel`` stays behind: ("ignored" | "secret" | "size", the rule), or None to upload it.

    Pure: decides from the relative path, the size and the limit alone."""
    rule = ignored_rule(rel)
    if rule:
        return "ignored", rule
    rule = secret_rule(rel, is_dir=is_dir)
    if rule:
        return "secret", rule
    if not is_dir and size > max_file_bytes:
        return "size", human_bytes(size)
    return None


def _ignore_spec(directory: Path):
    """The patterns of ``directory``'s .gitignore / .rayignore, as Ray reads them (or None)."""
    lines = []
    for name in IGNORE_FILES:
        path = directory / name
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    if not lines:
        return None
    # Ray's own gitignore matcher (Ray is pinned): the same patterns mean the same files.
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", lines)


def plan_upload(root: Path, *, max_file_mb: float = DEFAULT_MAX_FILE_MB) -> UploadPlan:
    """Walk ``root`` and decide, file by file, what the cluster receives."""
    if max_file_mb <= 0:
        raise ValueError(f"max_file_mb must be > 0; got {max_file_mb}")
    root = Path(root).resolve()
    plan = UploadPlan(root, int(max_file_mb * (1 << 20)))
    specs: list[tuple[str, object]] = []  # (folder relative to root, its ignore patterns)

    def ignored_by_files(rel: str, is_dir: bool) -> bool:
        for base, spec in specs:
            if not base or rel.startswith(base + "/"):
                sub = rel[len(base) + 1:] if base else rel
                if spec.match_file(sub + "/" if is_dir else sub):
                    return True
        return False

    def visit(directory: Path, rel_dir: str) -> None:
        spec = _ignore_spec(directory)
        if spec is not None:
            specs.append((rel_dir, spec))
        with os.scandir(directory) as entries:
            children = sorted(entries, key=lambda e: e.name)
        for entry in children:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root) or not target.exists():
                    if ignored_rule(rel) is None and not ignored_by_files(rel, False):
                        plan.skipped.append(Skipped(rel, "link", f"-> {os.readlink(path)}"))
                    continue
                if target.is_dir():
                    continue  # its files are uploaded where they lie, inside the root
            is_dir = entry.is_dir(follow_symlinks=True)
            size = 0 if is_dir else path.stat().st_size
            why = skip_reason(rel, size, is_dir=is_dir, max_file_bytes=plan.max_file_bytes)
            if why is None and ignored_by_files(rel, is_dir):
                why = ("ignored", "ignore file")
            if why is not None:
                if why[0] != "ignored":
                    plan.skipped.append(Skipped(rel + ("/" if is_dir else ""), why[0], why[1], size))
                continue
            if is_dir:
                visit(path, rel)
            else:
                plan.files.append((rel, size))
        if spec is not None:
            specs.pop()

    visit(root, "")
    return plan


def write_zip(plan: UploadPlan, dest: Path) -> Path:
    """Pack exactly ``plan.files`` into the zip ``dest`` (what Ray uploads and unpacks)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for rel, _ in plan.files:
            zf.write(plan.root / rel, rel)
    return dest
