"""File operations of the guest agent (standard library only): run inside the sandbox, as root.

Paths are resolved by the sandbox's own kernel (gVisor): `..` and symlinks can only lead to other
places inside the sandbox. Reads and writes stream in chunks; writes are atomic (temp file in the
same directory, fsync, rename) and owned by uid 1000.
"""

from __future__ import annotations

import contextlib
import os
import stat

try:
    from . import protocol as P
except ImportError:  # pragma: no cover - run as a script inside the sandbox
    import protocol as P  # type: ignore[no-redef,import-not-found]

CHUNK = 256 * 1024
MAX_LINE = 256 * 1024
LS_CAP = 10_000
OWNER = 1000


class FileError(Exception):
    def __init__(self, message: str, kind: str = P.INVALID):
        super().__init__(message)
        self.kind = kind


def info(st: os.stat_result) -> dict:
    return {
        "size": st.st_size,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "is_dir": stat.S_ISDIR(st.st_mode),
        "mtime": int(st.st_mtime),
    }


def path_error(path: str, e: OSError) -> FileError:
    if isinstance(e, FileNotFoundError):
        return FileError(f"no such file: {path}", P.NOT_FOUND)
    return FileError(f"{path}: {e.strerror}")


def checked_path(req: dict) -> str:
    path = req.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise FileError("path must be absolute")
    if "\x00" in path:
        raise FileError("path must not contain NUL characters")
    return path


def stat_path(req: dict) -> dict:
    path = checked_path(req)
    try:
        return info(os.stat(path))
    except OSError as e:
        raise path_error(path, e)


def read_file(req: dict, send) -> None:
    """FILE_INFO, then the content (whole, or truncated by lines/bytes), then EXIT."""
    path = checked_path(req)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise path_error(path, e)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileError(f"{path} is a directory (use ls=true)")
        raise FileError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        send(P.FILE_INFO, info(st))
        offset, limit, max_bytes = (int(req.get(k) or 0) for k in ("offset", "limit", "max_bytes"))
        if offset <= 0 and limit <= 0 and max_bytes <= 0:
            while chunk := f.read(CHUNK):
                send(P.STDOUT, chunk)
        else:
            read_lines(f, offset, limit, max_bytes, send)
    send(P.EXIT, {"exit_code": 0})


def read_lines(f, offset: int, limit: int, max_bytes: int, send) -> None:
    """Lines from `offset` (1-based), at most `limit` lines and `max_bytes` bytes (cut mid-line)."""
    line_no, lines, sent = 0, 0, 0
    out = bytearray()
    while True:
        line = f.readline(MAX_LINE)
        if not line:
            break
        line_no += 1
        if offset > 1 and line_no < offset:
            continue
        if not line.endswith(b"\n"):
            line += b"\n"
        if max_bytes > 0 and sent + len(out) + len(line) > max_bytes:
            out += line[: max_bytes - sent - len(out)]
            break
        out += line
        lines += 1
        if len(out) >= CHUNK:
            send(P.STDOUT, bytes(out))
            sent += len(out)
            out.clear()
        if limit > 0 and lines >= limit:
            break
    if out:
        send(P.STDOUT, bytes(out))


def write_file(req: dict, receive) -> dict:
    """Receive `size` bytes into a temp file beside the target, then rename it into place."""
    path = checked_path(req)
    size = req.get("size")
    if not isinstance(size, int) or size < 0:
        raise FileError("size must be a non-negative integer")
    mode = req.get("mode", 0o644)
    parent = os.path.dirname(path) or "/"
    try:
        make_dirs(parent)
    except OSError as e:
        raise FileError(f"{parent}: {e.strerror}")
    if os.path.isdir(path):
        raise FileError(f"{path} is a directory")
    tmp = f"{path}.kiln-tmp-{os.getpid()}-{id(req)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise FileError(f"{path}: {e.strerror}")
    try:
        left = size
        with os.fdopen(fd, "wb") as f:
            while left > 0:
                data = receive()
                if data is None:
                    raise FileError("upload ended early", P.FAILED)
                f.write(data[:left])
                left -= len(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.chown(tmp, OWNER, OWNER)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"exit_code": 0}


def make_dirs(path: str, uid: int = OWNER, gid: int = OWNER) -> None:
    """mkdir -p, new directories owned by uid 1000 (the user who writes there) unless told. A loop, not
    recursion: a path thousands of levels deep is an error from the kernel, never a crash of the agent."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
            os.chown(d, uid, gid)
        except FileExistsError:
            pass


def list_dir(req: dict) -> list[dict]:
    """lstat entries (symlinks not followed), at most 10,000, then a sentinel with the true total."""
    path = checked_path(req)
    try:
        it = os.scandir(path)
    except NotADirectoryError:
        raise FileError(f"{path} is not a directory")
    except OSError as e:
        raise path_error(path, e)
    entries, total = [], 0
    with it:
        for entry in it:
            total += 1
            if total > LS_CAP:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            entries.append({"name": entry.name, **info(st)})
    if total > LS_CAP:
        entries.append(
            {
                "name": f"... truncated at {LS_CAP} entries ({total} total)",
                "size": 0,
                "mode": "",
                "is_dir": False,
                "mtime": 0,
            }
        )
    return entries


# -- richer operations (the E2B filesystem service): entries with owners and links, mkdir, move, remove


def name_of(table, key: int) -> str:
    """A uid's or gid's name from pwd/grp, else the number."""
    try:
        return table(key)[0]
    except (KeyError, OverflowError):
        return str(key)


def entry(path: str) -> dict:
    """One entry: lstat, and for a symlink what it points to (its type is the target's, if any)."""
    import grp
    import pwd

    st = os.lstat(path)
    target = None
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        with contextlib.suppress(OSError):
            st = os.stat(path)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    return {
        "name": os.path.basename(path.rstrip("/")) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode) | (stat.S_IFDIR if kind == "dir" else 0),
        "permissions": stat.filemode(st.st_mode),
        "owner": name_of(pwd.getpwuid, st.st_uid),
        "group": name_of(grp.getgrgid, st.st_gid),
        "mtime_ns": st.st_mtime_ns,
        "symlink_target": target,
    }


def entries(req: dict) -> list[dict]:
    """depth 0: the path's own entry; depth N: what is under it, N levels deep (at most LS_CAP)."""
    path = checked_path(req)
    depth = req.get("depth", 0)
    if not isinstance(depth, int) or depth < 0:
        raise FileError("depth must be a non-negative integer")
    try:
        if depth == 0:
            return [entry(path)]
        if not os.path.isdir(path):
            os.stat(path)  # a missing path says so
            raise FileError(f"{path} is not a directory")
    except OSError as e:
        raise path_error(path, e)
    out: list[dict] = []
    level = [path]
    for _ in range(depth):
        below = []
        for d in level:
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for n in names:
                full = os.path.join(d, n)
                try:
                    item = entry(full)
                except OSError:
                    continue
                out.append(item)
                if len(out) >= LS_CAP:
                    return out
                if item["type"] == "dir" and item["symlink_target"] is None:
                    below.append(full)
        level = below
    return out


def make_dir(req: dict) -> dict:
    """mkdir -p owned by the request's user; created is False when the directory was there already."""
    import pwd

    path = checked_path(req)
    if os.path.isdir(path):
        return {"exit_code": 0, "created": False}
    if os.path.lexists(path):
        raise FileError(f"{path} exists and is not a directory", P.EXISTS)
    uid = gid = OWNER
    user = req.get("user")
    if isinstance(user, str) and user:
        try:
            pw = pwd.getpwnam(user)
            uid, gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            raise FileError(f"unknown user: {user}")
    try:
        make_dirs(path, uid, gid)
    except OSError as e:
        raise path_error(path, e)
    return {"exit_code": 0, "created": True}


def move(req: dict) -> dict:
    source = checked_path({"path": req.get("source")})
    destination = checked_path({"path": req.get("destination")})
    try:
        make_dirs(os.path.dirname(destination) or "/")
        os.rename(source, destination)
    except OSError as e:
        raise path_error(source, e)
    return {"exit_code": 0}


def remove(req: dict) -> dict:
    path = checked_path(req)
    if os.path.normpath(path) == "/":
        raise FileError("refusing to remove /")
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil

            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError as e:
        raise path_error(path, e)
    return {"exit_code": 0}
