"""Users and API keys: the admin user and its key file on first start."""

from __future__ import annotations

import secrets
from pathlib import Path

from ..config import Config
from ..fileio import write_atomic
from ..store.db import Store, User, now

KEY_PREFIX = "kiln_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_hex(32)


def new_user(
    name: str,
    config: Config,
    max_sandboxes: int | None = None,
    max_cpus: float | None = None,
    max_memory_mb: int | None = None,
    max_volume_storage_mb: int | None = None,
) -> User:
    """A user with quotas; anything not given takes the config's limit."""
    lim = config.limits
    return User(
        id="usr_" + secrets.token_hex(4),
        name=name,
        max_sandboxes=max_sandboxes or lim.max_sandboxes,
        max_cpus_per_sandbox=max_cpus or lim.max_cpus_per_sandbox,
        max_memory_mb_per_sandbox=max_memory_mb or lim.max_memory_mb_per_sandbox,
        created_at=now(),
        max_volume_storage_mb=max_volume_storage_mb or lim.max_volume_storage_mb,
    )


def ensure_admin(store: Store, config: Config) -> str | None:
    """Create the admin user and <data_dir>/admin.token (0600) on first start; return the new key."""
    token_file = config.data_dir / "admin.token"
    if store.user_by_name("admin") is not None:
        return None
    key = new_key()
    write_token(token_file, key)
    store.create_user(new_user("admin", config), key)
    return key


def write_token(path: Path, key: str) -> None:
    """Replaced atomically: a crash during rotate-key leaves the old key or the new one, never none."""
    write_atomic(path, key + "\n")
