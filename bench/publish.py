"""Publish and proxy benchmarks: a request to a published URL on a hot, warm and cold sandbox, and a
10 MB response through the proxy, each beside the same request sent straight to the app (no kiln).

The app is tests/integration/apps/web_app.py (Python's ThreadingHTTPServer, HTTP/1.1) on port 3000.
"""

from __future__ import annotations

import time

import httpx

from tests.conftest import WEB_APP
from tests.daemon import Daemon

THERMAL = {"warm_after": 0.5, "cold_after": 3600, "tick": 0.1}
BIG = 10_000_000
# bhatti's published figures (its README): publish wake hot / warm / cold
BHATTI = {"hot": 2.2, "warm": 3.7, "cold": 358.0}


def bench_publish(n: int) -> dict[str, list[float]]:
    d = Daemon({"thermal": THERMAL})
    res: dict[str, list[float]] = {
        k: [] for k in ("direct", "hot", "warm", "cold", "big_direct", "big_proxy", "big_public")
    }
    try:
        d.start()
        with d.client() as api:
            sb = api.post("/sandboxes", json={"name": "pub"}).json()
            sid = sb["id"]
            api.put(f"/sandboxes/{sid}/files", params={"path": "/tmp/web_app.py"}, content=WEB_APP.read_bytes())
            api.post(
                f"/sandboxes/{sid}/exec",
                json={"cmd": ["sh", "-c", "nohup python3 /tmp/web_app.py 3000 >/dev/null 2>&1 &"]},
            )
            for _ in range(100):
                if api.get(f"/sandboxes/{sid}/proxy/3000/").status_code == 200:
                    break
                time.sleep(0.1)
            alias = api.post(f"/sandboxes/{sid}/publish", json={"port": 3000}).json()["alias"]
            host = {"Host": f"{alias}.localhost:{d.port}"}
            direct_url = f"http://{sb['ip']}:3000"

            def thermal() -> str:
                return {s["id"]: s for s in api.get("/sandboxes").json()}[sid].get("thermal", "")

            # kiln opens one upstream connection per request, so the floor does too
            fresh = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(timeout=60) as public, httpx.Client(timeout=60, limits=fresh) as direct:

                def timed(key, client, url, headers=None):
                    t = time.perf_counter()
                    r = client.get(url, headers=headers)
                    res[key].append(time.perf_counter() - t)
                    assert r.status_code == 200, r.text

                # hot: back-to-back requests (the sandbox never idles); same app, straight, as the floor
                for i in range(n * 10 + 10):
                    if i < 10:
                        public.get(d.url + "/", headers=host)
                        direct.get(direct_url + "/")
                        continue
                    timed("direct", direct, direct_url + "/")
                    timed("hot", public, d.url + "/", host)
                for _ in range(n):
                    while thermal() != "warm":
                        time.sleep(0.05)
                    timed("warm", public, d.url + "/", host)
                for _ in range(n):
                    assert api.post(f"/sandboxes/{sid}/stop").json()["status"] == "stopped"
                    timed("cold", public, d.url + "/", host)
                api.patch(f"/sandboxes/{sid}", json={"keep_hot": True})
                for _ in range(max(3, n // 2)):
                    timed("big_direct", direct, f"{direct_url}/big?n={BIG}")
                    timed("big_public", public, f"{d.url}/big?n={BIG}", host)
                    timed("big_proxy", api, f"{d.url}/sandboxes/{sid}/proxy/3000/big?n={BIG}")
            api.delete(f"/sandboxes/{sid}")
    finally:
        d.scrub()
    return res
