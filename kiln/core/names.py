"""Every name rule of the API in one place: sandbox, template and volume names, env var and secret
names, labels, publish aliases."""

from __future__ import annotations

import re

from .errors import BadRequest

NAME_PATTERN = "[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}"
NAME_RE = re.compile(f"^{NAME_PATTERN}$")  # sandboxes, templates, volumes
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_NAME_PATTERN = "[A-Za-z_][A-Za-z0-9_.-]{0,127}"  # bhatti's names too, e.g. openai-key
SECRET_NAME_RE = re.compile(f"^{SECRET_NAME_PATTERN}$")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
LABEL_PART_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^[a-zA-Z0-9._-]*$")
RESERVED_LABEL_PREFIXES = ("bhatti.sh", "kiln.dev")
MAX_LABELS = 16


def is_text(s: str) -> bool:
    """False for strings JSON allows but no program can receive (lone surrogates such as \\ud800)."""
    try:
        s.encode()
        return True
    except UnicodeEncodeError:
        return False


def secret_env_name(name: str) -> str:
    """The env var a secret is injected as: its name if that is a valid env var name, else the name
    upper-cased with `-` and `.` as `_` (`openai-key` -> `OPENAI_KEY`)."""
    return name if ENV_KEY_RE.match(name) else name.upper().replace("-", "_").replace(".", "_")


def check_secret_names(names) -> None:
    for name in names:
        if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
            raise BadRequest(f"invalid secret name: {name!r} (must match {SECRET_NAME_PATTERN})")


def check_name(kind: str, name: object) -> str:
    """A sandbox/template/volume name, or 400 `invalid <kind> name: must match ...`."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(f"invalid {kind} name: must match {NAME_PATTERN}")
    return name


def check_env_keys(keys, what: str = "env var") -> None:
    for key in keys:
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            raise BadRequest(f"invalid {what} name: {key!r}")


def check_labels(labels: dict) -> None:
    if len(labels) > MAX_LABELS:
        raise BadRequest(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("labels must map strings to strings")
        prefix, _, name = key.rpartition("/")
        if prefix.startswith(RESERVED_LABEL_PREFIXES):
            raise BadRequest(f"label prefix {prefix!r} is reserved")
        if not LABEL_PART_RE.match(name) or (prefix and not LABEL_PART_RE.match(prefix)):
            raise BadRequest(f"invalid label key: {key!r}")
        if len(value) > 256 or not LABEL_VALUE_RE.match(value):
            raise BadRequest(f"invalid label value for {key!r}")
