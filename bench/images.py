"""Image benchmarks: create from `default` (751 MB) vs `minimal` (150 MB), interleaved; importing a
~200 MB root filesystem archive vs a plain `tar -x` of it; a Dockerfile build cold vs from the cache."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from kiln.images.builder import image_dir
from kiln.images.recipes import MINIMAL
from tests.daemon import IMAGES, Daemon

DOCKERFILE = """\
FROM minimal
ENV ROUND={round}
ENV APP_GREETING=hello
WORKDIR /srv/app
COPY hello.txt ./
RUN echo "$APP_GREETING" > made.txt && python3 -c "import json; print(json.dumps({{'ok': 1}}))"
USER kiln
CMD ["python3", "-m", "http.server", "8000"]
"""


def context(round_: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in (("Dockerfile", DOCKERFILE.format(round=round_)), ("hello.txt", "hello\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_archive(directory: Path) -> Path:
    """A plain rootfs tar of ~200 MB: the minimal image's tree and 50 MB that does not compress."""
    tree = directory / "tree"
    subprocess.run(["cp", "-a", str(image_dir(IMAGES, MINIMAL) / "rootfs"), str(tree)], check=True)  # devices too
    (tree / "opt" / "ballast").write_bytes(os.urandom(60 << 20))
    archive = directory / "rootfs.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(archive), "."], check=True)
    shutil.rmtree(tree)
    return archive


def bench_images(n: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in ("default", "minimal", "import", "untar", "cold", "cached")}
    res["archive_mb"] = []
    d = Daemon()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-images-"))
    try:
        d.start()
        with d.client(timeout=600) as api:
            for i in range(n):  # interleaved: a slow moment of the machine costs both the same
                for image in ("default", "minimal"):
                    t = time.perf_counter()
                    r = api.post("/sandboxes", json={"name": f"{image}-{i}", "image": image})
                    res[image].append(time.perf_counter() - t)
                    assert r.status_code == 201, r.text
                    api.delete(f"/sandboxes/{r.json()['id']}")
            archive = make_archive(work)
            res["archive_mb"].append(archive.stat().st_size / (1 << 20))
            for i in range(max(2, n // 3)):
                with open(archive, "rb") as f:
                    t = time.perf_counter()
                    r = api.post("/images/import", params={"name": f"imported-{i}"}, content=f)
                    res["import"].append(time.perf_counter() - t)
                assert r.status_code == 201, r.text
                api.delete(f"/images/imported-{i}")
                out = work / f"untar-{i}"
                out.mkdir()
                t = time.perf_counter()
                subprocess.run(["tar", "-C", str(out), "-xf", str(archive)], check=True)
                res["untar"].append(time.perf_counter() - t)
                shutil.rmtree(out)
            for i in range(max(2, n // 3)):
                body = context(i)
                for kind, name in (("cold", f"built-{i}"), ("cached", f"rebuilt-{i}")):
                    t = time.perf_counter()
                    r = api.post("/images/build", params={"name": name}, content=body)
                    res[kind].append(time.perf_counter() - t)
                    assert r.status_code == 200 and '"type": "done"' in r.text.splitlines()[-1], r.text[-500:]
                    api.delete(f"/images/{name}")
    finally:
        d.scrub()
        shutil.rmtree(work, ignore_errors=True)
    return res
