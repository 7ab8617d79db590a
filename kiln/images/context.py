"""A build context: the tar a client uploads with its Dockerfile. It is never extracted on the
host; COPY reads members straight from the tar, and a member whose path would leave the context
(absolute, `..`) can never be selected."""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .dockerfile import Copy, DockerfileError

MAX_DOCKERFILE_BYTES = 1 << 20
MAX_MEMBERS = 200_000  # a context's files: their headers are held in memory for the build
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Entry:
    dest: str  # absolute path in the image
    member: tarfile.TarInfo  # a regular file or a directory


def normal(name: str) -> str | None:
    """The member's path relative to the context root, or None if it would leave the context."""
    path = posixpath.normpath(name)
    if path.startswith("/") or path == ".." or path.startswith("../"):
        return None
    return "" if path == "." else path


class BuildContext:
    def __init__(self, tar_path: Path):
        try:
            self.tar = tarfile.open(tar_path, mode="r:*")  # noqa: SIM115 (read for the whole build; close())
            self.members: dict[str, tarfile.TarInfo] = {}
            for n, m in enumerate(self.tar):
                if n >= MAX_MEMBERS:
                    self.tar.close()
                    raise DockerfileError(f"the build context has more than {MAX_MEMBERS} files")
                path = normal(m.name)
                if path:
                    self.members[path] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DockerfileError(f"the build context is not a readable tar archive ({e})") from None

    def close(self) -> None:
        self.tar.close()

    def read_text(self, name: str) -> str:
        path = normal(name)
        member = self.members.get(path or "")
        if member is None or not member.isfile():
            raise DockerfileError(f"{name} is not a file in the build context")
        if member.size > MAX_DOCKERFILE_BYTES:
            raise DockerfileError(f"{name} is larger than {MAX_DOCKERFILE_BYTES} bytes")
        f = self.tar.extractfile(member)
        assert f is not None
        return f.read().decode("utf-8", errors="replace")

    def under(self, directory: str) -> list[str]:
        prefix = f"{directory}/" if directory else ""
        return sorted(p for p in self.members if p.startswith(prefix) and p != directory)

    def select(self, copy: Copy) -> list[Entry]:
        """What a COPY writes, where; DockerfileError if a source matches nothing or is not a file
        or directory."""
        into = copy.dest.endswith("/")
        out: list[Entry] = []
        for source in copy.sources:
            src = "" if source == "." else source
            if GLOB_CHARS & set(src):
                matches = sorted(p for p in self.members if fnmatch.fnmatchcase(p, src))
            else:
                matches = [src] if src in self.members or self.under(src) or not src else []
            if not matches:
                raise DockerfileError(f"COPY {source}: no such file or directory in the build context")
            for match in matches:
                member = self.members.get(match)
                if member is not None and member.isfile():
                    dest = posixpath.join(copy.dest, posixpath.basename(match)) if into else copy.dest
                    out.append(Entry(dest, member))
                    continue
                base = copy.dest.rstrip("/") or "/"
                for path in self.under(match):
                    out.append(Entry(posixpath.join(base, path[len(match) :].lstrip("/")), self.members[path]))
        for e in out:
            if not (e.member.isfile() or e.member.isdir()):
                raise DockerfileError(f"COPY {e.member.name}: only files and directories can be copied")
        return out

    def digest(self, entries: list[Entry]) -> str:
        """What the entries hold (paths, modes, content): part of a COPY step's cache key."""
        h = hashlib.sha256()
        for e in entries:
            h.update(f"{e.dest}\0{e.member.mode}\0{e.member.size}\0{e.member.type!r}\0".encode())
            if e.member.isfile():
                f = self.tar.extractfile(e.member)
                assert f is not None
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()

    def chunks(self, member: tarfile.TarInfo, size: int = 1 << 16):
        f = self.tar.extractfile(member)
        assert f is not None
        while chunk := f.read(size):
            yield chunk
