"""Secrets: named values per user, sealed at rest, injected into sandboxes as environment variables.

Values are sealed with AES-256-GCM (the `cryptography` library) under `<data_dir>/secret.key`
(32 random bytes, mode 0600, made on first start). The associated data binds each sealed value to
its owner and name, so a value copied to another row does not open. A sandbox created with
secrets keeps their values, sealed the same way, in its own row: later edits or deletes of the
secret do not change it, and it can be handed to the sandbox again after a reboot.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..fileio import key_file
from ..store.db import SecretRow, Store, User
from .errors import BadRequest, Internal, NotFound
from .names import check_secret_names, secret_env_name

MAX_VALUE = 64 * 1024
NONCE = 12


class SecretBox:
    def __init__(self, key_path: Path):
        self.aead = AESGCM(key_file(key_path, lambda: AESGCM.generate_key(bit_length=256)))

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self.aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        return self.aead.decrypt(sealed[:NONCE], sealed[NONCE:], context.encode())


class SecretService:
    def __init__(self, store: Store, box: SecretBox):
        self.store = store
        self.box = box

    def set(self, user: User, name: str, value: str) -> SecretRow:
        if not name or not value:
            raise BadRequest("name and value required")
        check_secret_names([name])
        if len(value.encode()) > MAX_VALUE:
            raise BadRequest("secret value too large (max 64 KiB)")
        return self.store.upsert_secret(user.id, name, self.box.seal(value.encode(), f"secret:{user.id}:{name}"))

    def list(self, user: User) -> builtins.list[SecretRow]:
        return self.store.list_secrets(user.id)

    def delete(self, user: User, name: str) -> None:
        if not self.store.delete_secret(user.id, name):
            raise NotFound(f'secret "{name}" not found')

    def resolve(self, user: User, names: builtins.list[str]) -> dict[str, str]:
        """The named secrets as env vars (see names.secret_env_name); 400 for a name the user has no secret of."""
        values = {}
        for name in names:
            row = self.store.get_secret(user.id, name)
            if row is None:
                raise BadRequest(f'secret "{name}" not found')
            try:
                values[secret_env_name(name)] = self.box.open(row.sealed, f"secret:{user.id}:{name}").decode()
            except InvalidTag:
                raise Internal(f'decrypt secret "{name}" of {user.id} failed') from None
        return values

    # the secret environment a sandbox was created with

    def seal_env(self, sandbox_id: str, env: dict[str, str]) -> bytes | None:
        return self.box.seal(json.dumps(env).encode(), f"sandbox:{sandbox_id}") if env else None

    def open_env(self, sandbox_id: str, sealed: bytes | None) -> dict[str, str]:
        return json.loads(self.box.open(sealed, f"sandbox:{sandbox_id}")) if sealed else {}
