"""File benchmarks: read and write through the API at several sizes, and ls of /usr/bin."""

from __future__ import annotations

import os
import time

from tests.daemon import Daemon

SIZES = [("1 KB", 1024), ("100 KB", 100 * 1024), ("1 MB", 1024 * 1024), ("10 MB", 10 * 1024 * 1024)]
# bhatti's published figures for the same operations (its README), where it gives them
BHATTI = {("read", "1 MB"): 14.9, ("write", "100 KB"): 13.7}


def bench_files(n: int) -> dict[tuple[str, str], list[float]]:
    d = Daemon()
    res: dict[tuple[str, str], list[float]] = {}
    try:
        d.start()
        with d.client() as api:
            sid = api.post("/sandboxes", json={"name": "files", "keep_hot": True}).json()["id"]
            url = f"/sandboxes/{sid}/files"
            for label, size in SIZES:
                data = os.urandom(size)
                path = f"/workspace/bench-{size}"
                for op in ("write", "read"):
                    samples = res.setdefault((op, label), [])
                    for i in range(n + 3):
                        t = time.perf_counter()
                        if op == "write":
                            r = api.put(url, params={"path": path}, content=data)
                        else:
                            r = api.get(url, params={"path": path})
                            assert len(r.content) == size
                        elapsed = time.perf_counter() - t
                        assert r.status_code == 200, r.text
                        if i >= 3:  # warm-up
                            samples.append(elapsed)
            samples = res.setdefault(("ls", "/usr/bin"), [])
            for i in range(n + 3):
                t = time.perf_counter()
                r = api.get(url, params={"path": "/usr/bin", "ls": "true"})
                elapsed = time.perf_counter() - t
                assert r.status_code == 200 and len(r.json()) > 50
                if i >= 3:
                    samples.append(elapsed)
    finally:
        d.scrub()
    return res
