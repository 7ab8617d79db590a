"""Where the CLI's daemon is and which key it uses: --url/--token, then $KILN_URL/$KILN_TOKEN, then
~/.kiln/config.yaml (`kiln setup`), then, on the server host as root, the admin key. Standard library
and PyYAML only: the fast path of the hot verbs reads it too."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..config_paths import DEFAULT_DATA_DIR, config_file

CLIENT_CONFIG = Path.home() / ".kiln" / "config.yaml"
DEFAULT_URL = "http://127.0.0.1:8080"


def client_settings(url: str | None = None, token: str | None = None) -> tuple[str, str]:
    url = url or os.environ.get("KILN_URL")
    token = token or os.environ.get("KILN_TOKEN")
    if not (url and token) and CLIENT_CONFIG.exists():  # YAML is parsed (and imported) only when needed
        saved = read_yaml(CLIENT_CONFIG)
        url, token = url or saved.get("url"), token or saved.get("token")
    return url or DEFAULT_URL, token or admin_token()


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def admin_token() -> str:
    """The admin key in the server's data dir, readable by root on the server host; else ''."""
    with contextlib.suppress(OSError, TypeError):
        chosen = config_file()
        data = read_yaml(chosen) if chosen is not None else {}
        data_dir = Path(data.get("data_dir") or DEFAULT_DATA_DIR)
        return (data_dir / "admin.token").read_text().strip()
    return ""
