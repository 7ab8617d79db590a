"""Dockerfile builds through POST /images/build against real sandboxes: streamed steps, the
built image's files, env, workdir and start command, the per-step cache, and failures that leave
nothing behind."""

import io
import json
import tarfile

import pytest

from tests.conftest import make_sandbox, run, wait_for

DOCKERFILE = """\
# a tiny web app
FROM minimal
ARG GREETING=hello
ENV APP_GREETING=${GREETING} APP_MODE=built
WORKDIR /srv/app
COPY hello.txt ./
COPY site/ /srv/app/site/
RUN echo "$APP_GREETING from $APP_MODE in $(pwd)" > made.txt && id -u >> made.txt
USER kiln
EXPOSE 8000
CMD ["python3", "-m", "http.server", "8000", "--directory", "/srv/app/site"]
"""


def context_tar(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build(api, name: str, files: dict, **params) -> tuple[int, list[dict]]:
    r = api.post("/images/build", params={"name": name, **params}, content=context_tar(files), timeout=600)
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.status_code, [r.json()]
    return r.status_code, [json.loads(line) for line in r.text.splitlines() if line.strip()]


APP = {"Dockerfile": DOCKERFILE, "hello.txt": "copied from the context\n", "site/index.html": "<h1>built</h1>\n"}


def steps(events) -> list[dict]:
    return [e for e in events if e["type"] == "step"]


def test_a_dockerfile_builds_and_its_sandboxes_start_its_command(api):
    status, events = build(api, "webapp", APP)
    assert status == 200 and events[-1]["type"] == "done", events[-3:]
    ran = steps(events)
    assert [s["n"] for s in ran] == list(range(1, 11)) and all(s["of"] == 10 for s in ran)
    assert ran[0]["instruction"] == "FROM minimal" and ran[6]["instruction"].startswith("RUN echo")
    assert not any(s["cached"] for s in ran if s["instruction"].split()[0] in ("COPY", "RUN", "WORKDIR"))
    image = events[-1]["image"]
    assert image["name"] == "webapp" and image["source"] == "build"
    assert image["config"]["env"] == {"APP_GREETING": "hello", "APP_MODE": "built"}
    assert image["config"]["workdir"] == "/srv/app" and image["config"]["user"] == "kiln"
    assert image["config"]["exposed_ports"] == [8000]
    assert any(e["type"] == "stdout" and "hello.txt" in e["data"] for e in events)

    sb = make_sandbox(api, image="webapp")
    try:
        # the start command runs at boot, as session "start", without any exec
        wait_for(
            lambda: 8000 in {p["container_port"] for p in api.get(f"/sandboxes/{sb['id']}/ports").json()},
            what="the image's CMD listening",
        )
        sessions = {s["session_id"]: s for s in api.get(f"/sandboxes/{sb['id']}/sessions").json()}
        assert "start" in sessions and "http.server" in sessions["start"]["argv"]
        page = api.get(f"/sandboxes/{sb['id']}/proxy/8000/index.html")
        assert page.status_code == 200 and page.text == "<h1>built</h1>\n"
        r = run(api, sb, ["sh", "-c", "pwd; id -un; echo $APP_GREETING; cat made.txt hello.txt"])
        assert r["stdout"].splitlines() == [
            "/srv/app",
            "kiln",
            "hello",
            "hello from built in /srv/app",
            "0",  # RUN ran as root: USER came after it
            "copied from the context",
        ], r
        owners = run(api, sb, ["stat", "-c", "%u", "/srv/app/hello.txt", "/home/kiln", "/workspace"])["stdout"]
        assert owners.split() == ["0", "1000", "1000"]  # COPY gives root; the image's own dirs keep theirs
    finally:
        api.delete(f"/sandboxes/{sb['id']}")

    # unchanged: every step from the cache, and the same result
    status, again = build(api, "webapp-again", APP)
    assert status == 200 and again[-1]["type"] == "done", again[-3:]
    assert all(s["cached"] for s in steps(again)) and again[-1]["cached_steps"] == 10
    assert not any(e["type"] == "stdout" for e in again)
    # a changed file: the steps before it from the cache, the rest run again
    status, changed = build(api, "webapp-changed", {**APP, "site/index.html": "<h1>changed</h1>\n"})
    assert status == 200 and changed[-1]["type"] == "done", changed[-3:]
    cached = {s["instruction"].split()[0] + str(s["n"]): s["cached"] for s in steps(changed)}
    assert cached["WORKDIR4"] and cached["COPY5"] and not cached["COPY6"] and not cached["RUN7"]
    for name in ("webapp", "webapp-again", "webapp-changed"):
        assert api.delete(f"/images/{name}").status_code == 200


def test_a_failing_step_fails_the_build_and_leaves_nothing(api, daemon):
    before = {s["id"] for s in api.get("/sandboxes").json()}
    files = {"Dockerfile": "FROM minimal\nRUN echo about to fail && exit 3\nRUN echo never\n"}
    status, events = build(api, "broken", files)
    assert status == 200
    last = events[-1]
    assert last["type"] == "error" and last["exit_code"] == 3 and "step 2" in last["error"], last
    assert any(e["type"] == "stdout" and "about to fail" in e["data"] for e in events)
    assert api.get("/images/broken").status_code == 404
    assert {s["id"] for s in api.get("/sandboxes").json()} == before
    assert not list((daemon.data_dir / "build-cache" / "sandboxes").iterdir())


@pytest.mark.parametrize(
    ("dockerfile", "status", "needle"),
    [
        ("FROM minimal\nHEALTHCHECK CMD true\n", 400, "line 2: HEALTHCHECK: not supported"),
        ("FROM minimal\nFROM minimal\n", 400, "multi-stage"),
        ("RUN true\n", 400, "first instruction must be FROM"),
        ("FROM no-such-image\n", 404, 'image "no-such-image" not found'),
        ("FROM minimal\nCOPY missing.txt /\n", 400, "missing.txt: no such file"),
        ("FROM minimal\nADD https://example.com/x /x\n", 400, "URLs are not supported"),
        ("FROM minimal\nCOPY ../outside /x\n", 400, "outside the build context"),
        ("FROM minimal\nCOPY --from=builder /a /b\n", 400, "--from is not supported"),
    ],
)
def test_dockerfiles_kiln_cannot_build_are_refused_up_front(api, dockerfile, status, needle):
    got, events = build(api, "refused", {"Dockerfile": dockerfile})
    assert got == status and needle in events[0]["error"], events
    assert api.get("/images/refused").status_code == 404


def test_build_request_errors(api):
    assert build(api, "no-dockerfile", {"other.txt": "x"})[0] == 400
    got, events = build(
        api, "named", {"build/Containerfile": "FROM minimal\nENV A=1\n"}, dockerfile="build/Containerfile"
    )
    assert got == 200 and events[-1]["type"] == "done", events
    assert events[-1]["image"]["config"]["env"] == {"A": "1"}
    assert api.delete("/images/named").status_code == 200
    assert api.post("/images/build", params={"name": "x"}, content=b"not a tar").status_code == 400
    assert api.post("/images/build", params={"name": "default"}, content=context_tar(APP)).status_code == 409
