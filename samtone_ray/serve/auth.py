"""Who may call ``samtone serve``, without Ray: API keys (``Authorization: Bearer``) and trusted
``Host`` values.

Keys, as TEI, infinity and vLLM take them: ``--api-key`` (repeatable), ``$SAMTONE_API_KEY`` and
a key file, one key a line. A replica never holds a key itself: it gets SHA-256 digests, or the
name of an environment variable that holds the keys (a Kubernetes secret), and compares the
digest of what a client sends with each of them in constant time.

The ``Host`` check refuses requests whose ``Host`` names another server: a web page that rebinds
its own DNS name to 127.0.0.1 then reaches a local server, but with its own name as ``Host``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from samtone_ray.serve.api import ApiError

KEY_ENV = "SAMTONE_API_KEY"
# Probes stay open (a kubelet sends no key); OPTIONS (CORS preflight) carries no credentials by design.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
ANY_HOST = "*"


class KeyError_(ValueError):
    """A key, key file or key variable that cannot be used; the message names where it came from."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _checked(key: str, where: str) -> str:
    key = key.strip()
    if not key:
        raise KeyError_(f"{where}: an empty API key")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise KeyError_(f"{where}: an API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def split_keys(text: str, where: str) -> list[str]:
    """Keys in ``text``: one a line (commas also separate them); blank lines and ``#`` comments skipped."""
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys += [_checked(k, f"{where}, line {n}") for k in line.split(",") if k.strip()]
    return keys


def read_key_file(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyError_(f"--api-key-file {path}: cannot read it ({exc})") from None
    keys = split_keys(text, f"--api-key-file {path}")
    if not keys:
        raise KeyError_(f"--api-key-file {path}: holds no key (one key a line)")
    return keys


def collect_keys(keys: Iterable[str], key_file: str | Path | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The keys of ``--api-key`` (each), ``--api-key-file`` and ``$SAMTONE_API_KEY``, together."""
    out = [_checked(k, "--api-key") for k in keys]
    if key_file is not None:
        out += read_key_file(key_file)
    if environ.get(KEY_ENV, "").strip():
        out += split_keys(environ[KEY_ENV], f"${KEY_ENV}")
    return out


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(bind_host: str, extra: Iterable[str] = ()) -> list[str]:
    """Loopback names, the bind address and ``extra`` (``--trusted-host``). A wildcard bind (0.0.0.0,
    ::) without ``extra`` cannot know the names clients use (a Service, an ingress): any Host then,
    and an API key is required there anyway. Loopback names are always in: a rebinding page sends
    its own name, never ``localhost``."""
    extra = [h.lower() for h in extra]
    if bind_host in WILDCARD_BINDS:
        return [*LOOPBACK_HOSTS, *extra] if extra else [ANY_HOST]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, bind_host.lower(), *extra]))


def host_name(header: str) -> str:
    """The name in a ``Host`` header: no port, no IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


@dataclass(frozen=True)
class AccessPolicy:
    """``key_digests`` empty: no key asked. ``trusted_hosts`` holds names, ``*`` (any) or
    ``*.example.com`` (its subdomains)."""

    key_digests: frozenset[bytes] = frozenset()
    trusted_hosts: tuple[str, ...] = LOOPBACK_HOSTS

    @classmethod
    def build(
        cls,
        key_sha256: Iterable[str] = (),
        key_env: str | None = None,
        trusted_hosts: Iterable[str] | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> AccessPolicy:
        """From a deployment's arguments: hex digests, and/or the name of a variable of this
        process that holds keys (fail closed: a named variable that is unset or empty is an error)."""
        digests = set()
        for h in key_sha256:
            try:
                raw = bytes.fromhex(h)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise KeyError_(f"api_key_sha256: {h[:12]!r}... is not a SHA-256 hex digest")
            digests.add(raw)
        if key_env:
            if not environ.get(key_env, "").strip():
                raise KeyError_(
                    f"api_key_env={key_env}: the variable is not set in this replica's environment; set it on "
                    "every node (a Kubernetes secret, see docs/serving.md) or deploy without api_key_env"
                )
            digests |= {bytes.fromhex(digest(k)) for k in split_keys(environ[key_env], f"${key_env}")}
        hosts = tuple(host_name(h) if h != ANY_HOST and not h.startswith("*.") else h.lower() for h in trusted_hosts or LOOPBACK_HOSTS)
        return cls(frozenset(digests), hosts)

    def host_trusted(self, header: str | None) -> bool:
        if ANY_HOST in self.trusted_hosts:
            return True
        if not header:
            return False
        name = host_name(header)
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.trusted_hosts)

    def key_valid(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        # Every digest is compared (no early exit), so timing says nothing about which one matched.
        matches = [secrets.compare_digest(presented, d) for d in self.key_digests]
        return any(matches)

    def refusal(self, method: str, path: str, host: str | None, authorization: str | None) -> ApiError | None:
        """Why this request may not pass (400 untrusted Host, 401 no or wrong key), or None."""
        if not self.host_trusted(host):
            shown = (host or "")[:100]
            return ApiError(400, f"Host {shown!r} is not a trusted host of this server (samtone serve --trusted-host)", code="untrusted_host")
        if not self.key_digests or method == "OPTIONS" or path in OPEN_PATHS:
            return None
        if self.key_valid(authorization):
            return None
        missing = not (authorization or "").strip()
        return ApiError(
            401,
            "no API key given: send 'Authorization: Bearer <key>' (the openai client: api_key=...)"
            if missing
            else "the API key is not valid for this server",
            code="missing_api_key" if missing else "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
