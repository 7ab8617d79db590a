"""Files a create request asks for (bhatti's `files`): written into the sandbox before its init runs."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .errors import BadRequest
from .names import is_text


@dataclass
class FileRequest:
    guest_path: str | None
    content: str  # base64
    mode: str = "0644"  # octal


@dataclass
class BootFile:
    path: str
    content: bytes
    mode: int


def check_boot_files(requested: list[FileRequest]) -> list[BootFile]:
    """Decode and check every file before anything is made; the messages are bhatti's."""
    out = []
    for f in requested:
        if not f.guest_path:
            raise BadRequest("file guest_path required")
        path = f.guest_path
        if not path.startswith("/") or "\x00" in path or not is_text(path):
            raise BadRequest(f'file "{path[:200]}": guest_path must be an absolute path')
        try:
            content = base64.b64decode(f.content, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f'file "{path}": invalid base64 content') from None
        try:
            mode = int(f.mode or "0644", 8)
        except ValueError:
            raise BadRequest(f'file "{path}": invalid mode {f.mode!r} (an octal string such as "0644")') from None
        if not 0 <= mode <= 0o7777:
            raise BadRequest(f'file "{path}": invalid mode {f.mode!r} (an octal string such as "0644")')
        out.append(BootFile(path, content, mode))
    return out
