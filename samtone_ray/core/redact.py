"""Mask the secrets a URI can carry before it is printed, logged or stored.

Tracking servers, object stores and databases accept credentials inside the URI itself
(``http://user:password@host``, ``postgresql://user:pw@db/mlflow``, ``?token=...``, presigned
``X-Amz-Signature=...``). Every place that shows or records a URI passes it through
:func:`redact_uri`, which works on a single URI and on any text holding URIs (a command line,
a YAML document, an error message), and leaves text without credentials unchanged.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://USERINFO@ : the password after the first colon, or the whole userinfo when it has no
# colon (a token used as the user name, as GitHub and some registries do). Greedy up to the last
# "@" before the path, so an unencoded "@" inside the password is masked too.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#]*)@")
# ?name=value / &name=value where the name says it holds a secret (password, token, api_key,
# X-Amz-Signature, X-Amz-Credential, sig (Azure SAS), client_secret, ...).
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:sig|[^=&;\s#]*?(?:passw(?:or)?d|pwd|token|secret|signature|credential|api[_-]?key|access[_-]?key)"
    r"[^=&;\s#]*)=)(?P<value>[^&;\s#'\"]*)",
    re.IGNORECASE,
)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    if not userinfo:
        return match[0]
    user, colon, _ = userinfo.partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"


def redact_uri(text: str) -> str:
    """``text`` with every URI password, userinfo token and secret query value replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: m["name"] + (MASK if m["value"] else ""), text)


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a secret that :func:`redact_uri` would mask."""
    return redact_uri(uri) != uri


def strip_credentials(uri: str) -> str:
    """``uri`` without its userinfo and secret query parameters: what may travel to another
    machine, which supplies the credentials itself (e.g. MLflow's ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN`` in its own environment)."""
    uri = _USERINFO.sub(lambda m: m["scheme"], uri)
    uri = _SECRET_PARAM.sub(lambda m: m["name"][0], uri)
    # Drop the now-empty "&" / "?" the removed parameters leave behind.
    uri = re.sub(r"[&;](?=[&;#]|$)", "", uri)
    return re.sub(r"\?[&;]*(?=#|$)", "", re.sub(r"\?[&;]+", "?", uri))
