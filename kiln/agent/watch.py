"""Directory watches for the guest agent (standard library only): inotify through ctypes.

WATCH_REQ {"path", "recursive"} answers WATCH_OK once the watch is set, then one WATCH_EVENT
{"name": path relative to the watched directory, "type": create|write|remove|rename|chmod} per
change, until the host closes the connection. gVisor's inotify sees every change made inside the
sandbox. A recursive watch also watches directories made under it after it started.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import struct

try:
    from . import protocol as P
    from .wire import Conn, RequestError
except ImportError:  # pragma: no cover
    import protocol as P  # type: ignore[no-redef,import-not-found]
    from wire import Conn, RequestError  # type: ignore[no-redef,import-not-found]

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x400, 0x40000000, 0o4000, 0o2000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded
MAX_WATCHES = 8192  # directories of one recursive watch


def kind_of(mask: int) -> str | None:
    if mask & (IN_CREATE | IN_MOVED_TO):
        return "create"
    if mask & IN_MODIFY:
        return "write"
    if mask & (IN_DELETE | IN_DELETE_SELF):
        return "remove"
    if mask & IN_MOVED_FROM:
        return "rename"
    if mask & IN_ATTRIB:
        return "chmod"
    return None


class Inotify:
    def __init__(self, root: str, recursive: bool):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise RequestError(f"inotify: {os.strerror(ctypes.get_errno())}", P.FAILED)
        self.root = root.rstrip("/") or "/"
        self.recursive = recursive
        self.dirs: dict[int, str] = {}
        self.add(self.root)
        if recursive:
            for d, subdirs, _files in os.walk(self.root):
                for s in subdirs:
                    self.add(os.path.join(d, s))

    def add(self, path: str) -> None:
        if len(self.dirs) >= MAX_WATCHES:
            return
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            if path == self.root:
                err = ctypes.get_errno()
                raise RequestError(f"watch {path}: {os.strerror(err)}", P.NOT_FOUND if err == 2 else P.INVALID)
            return
        self.dirs[wd] = path

    def events(self) -> list[dict]:
        try:
            buf = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + EVENT.size <= len(buf):
            wd, mask, _cookie, n = EVENT.unpack_from(buf, i)
            name = buf[i + EVENT.size : i + EVENT.size + n].rstrip(b"\0").decode(errors="replace")
            i += EVENT.size + n
            base = self.dirs.get(wd)
            kind = kind_of(mask)
            if base is None or kind is None or (mask & IN_DELETE_SELF and base != self.root):
                continue
            full = os.path.join(base, name) if name else base
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self.add(full)
            out.append({"name": os.path.relpath(full, self.root), "type": kind})
        return out

    def close(self) -> None:
        os.close(self.fd)


def watch(conn: Conn, req: dict) -> None:
    path = req.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise RequestError("path must be absolute")
    if not os.path.isdir(path):
        raise RequestError(f"{path} is not a directory", P.NOT_FOUND if not os.path.exists(path) else P.INVALID)
    ino = Inotify(path, bool(req.get("recursive")))
    sel = selectors.DefaultSelector()
    try:
        sel.register(ino.fd, selectors.EVENT_READ)
        sel.register(conn.sock, selectors.EVENT_READ)
        if not conn.send(P.WATCH_OK):
            return
        while True:
            for key, _ in sel.select():
                if key.fileobj is conn.sock:
                    if not conn.sock.recv(4096):
                        return  # the host stopped watching
                    continue
                for ev in ino.events():
                    if not conn.send_json(P.WATCH_EVENT, ev):
                        return
    finally:
        sel.close()
        ino.close()
