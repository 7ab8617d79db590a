"""The async kiln SDK. `kiln.client.Kiln` is the same API, synchronous.

    async with AsyncKiln() as kiln:                     # KILN_URL / KILN_TOKEN, or url=, token=
        sb = await kiln.sandboxes.create(name="dev")
        result = await sb.commands.run("echo hi", on_stdout=print)
        await sb.files.write("/workspace/a.txt", b"data")
        await sb.destroy()

Timeouts are in seconds. Every failure the API reports raises a typed exception from
kiln.client.errors (NotFound, Unauthorized, RateLimited, InvalidArgument, Conflict, Timeout, ...).
"""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect as ws_connect
from websockets.exceptions import ConnectionClosed

from .errors import BuildFailed, KilnError, Timeout, error_for

DEFAULT_URL = "http://127.0.0.1:8080"
NDJSON = "application/x-ndjson"


@dataclass
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False


def _argv(cmd: str | list[str]) -> list[str]:
    """A string runs through the shell (like a terminal); a list runs as is."""
    return ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


class AsyncKiln:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("KILN_URL") or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get("KILN_TOKEN") or ""
        self.timeout = timeout
        self.http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {self.token}"} if self.token else {}
        )
        self.sandboxes = AsyncSandboxes(self)
        self.secrets = AsyncSecrets(self)
        self.volumes = AsyncVolumes(self)
        self.templates = AsyncTemplates(self)
        self.snapshots = AsyncSnapshots(self)
        self.images = AsyncImages(self)

    async def __aenter__(self) -> AsyncKiln:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, *, timeout: float | None = None, **kw) -> httpx.Response:
        try:
            r = await self.http.request(method, path, timeout=timeout or self.timeout, **kw)
        except httpx.TimeoutException as e:
            raise Timeout(f"{method} {path}: no answer in time") from e
        except httpx.HTTPError as e:
            raise KilnError(f"cannot reach kiln at {self.url}: {e}") from e
        raise_for(r)
        return r

    async def json(self, method: str, path: str, **kw) -> Any:
        r = await self.request(method, path, **kw)
        return r.json() if r.content else None

    async def health(self) -> dict:
        return await self.json("GET", "/health")

    async def ports(self) -> list[dict]:
        """Listening ports of all your sandboxes (from the last scan; wakes nothing)."""
        return await self.json("GET", "/ports")


def raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
        message, request_id = body.get("error", r.reason_phrase), body.get("request_id")
    except ValueError:
        message, request_id = r.text or r.reason_phrase, None
    raise error_for(r.status_code, message, request_id, r.headers.get("retry-after"))


class AsyncSandboxes:
    def __init__(self, kiln: AsyncKiln):
        self.kiln = kiln

    async def create(
        self,
        name: str | None = None,
        *,
        image: str | None = None,
        cpus: float | None = None,
        memory_mb: int | None = None,
        env: dict[str, str] | None = None,
        init: str | None = None,
        keep_hot: bool | None = None,
        template: str | None = None,
        secrets: list[str] | None = None,
        volumes: list[dict] | None = None,
        new_volumes: list[dict] | None = None,
        net_policy: dict | None = None,
        timeout: float = 120.0,
    ) -> AsyncSandbox:
        """Create a sandbox (or get the existing one of that name) from `image` (default: the
        default developer image). net_policy: egress, e.g.
        {"default": "deny", "allow_hosts": ["example.com", "*.example.org"], "allow_cidrs": []}."""
        body = {
            k: v
            for k, v in {
                "name": name,
                "image": image,
                "cpus": cpus,
                "memory_mb": memory_mb,
                "env": env,
                "init": init,
                "keep_hot": keep_hot,
                "template_id": template,
                "secrets": secrets,
                "volumes": volumes,
                "new_volumes": new_volumes,
                "net_policy": net_policy,
            }.items()
            if v is not None
        }
        return AsyncSandbox(self.kiln, await self.kiln.json("POST", "/sandboxes", json=body, timeout=timeout))

    async def list(self) -> list[AsyncSandbox]:
        return [AsyncSandbox(self.kiln, d) for d in await self.kiln.json("GET", "/sandboxes")]

    async def get(self, id_or_name: str) -> AsyncSandbox:
        return await AsyncSandbox.connect(id_or_name, self.kiln)


class AsyncSandbox:
    """A handle on one sandbox; `info` is its JSON as last seen."""

    def __init__(self, kiln: AsyncKiln, info: dict):
        self.kiln = kiln
        self.info = info
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)

    @classmethod
    async def connect(cls, id_or_name: str, kiln: AsyncKiln | None = None) -> AsyncSandbox:
        kiln = kiln or AsyncKiln()
        return cls(kiln, await kiln.json("GET", f"/sandboxes/{id_or_name}"))

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def status(self) -> str:
        return self.info["status"]

    def __repr__(self) -> str:
        return f"<Sandbox {self.name} ({self.id}) {self.status}>"

    @property
    def path(self) -> str:
        return f"/sandboxes/{self.id}"

    async def refresh(self) -> AsyncSandbox:
        self.info = await self.kiln.json("GET", self.path)
        return self

    async def update(
        self,
        *,
        name: str | None = None,
        keep_hot: bool | None = None,
        labels: dict[str, str] | None = None,
        remove_labels: list[str] | None = None,
    ) -> AsyncSandbox:
        body = {
            k: v
            for k, v in {
                "name": name,
                "keep_hot": keep_hot,
                "labels_add": labels,
                "labels_remove": remove_labels,
            }.items()
            if v is not None
        }
        self.info = await self.kiln.json("PATCH", self.path, json=body)
        return self

    async def fork(
        self, name: str | None = None, net_policy: dict | None = None, timeout: float = 300.0
    ) -> AsyncSandbox:
        """A copy of this sandbox at this instant, memory and processes included (it keeps running)."""
        body = {"from": self.id} | ({"name": name} if name else {}) | ({"net_policy": net_policy} if net_policy else {})
        return AsyncSandbox(self.kiln, await self.kiln.json("POST", "/sandboxes", json=body, timeout=timeout))

    async def checkpoint(self, name: str, timeout: float = 300.0) -> dict:
        """Keep a copy of this sandbox (memory and disk) as the named snapshot; it keeps running."""
        return await self.kiln.json("POST", f"{self.path}/checkpoint", json={"name": name}, timeout=timeout)

    async def save_image(self, name: str, timeout: float = 1800.0) -> dict:
        """This sandbox's root disk as a new image (it keeps running, paused only for a disk clone)."""
        return await self.kiln.json("POST", f"{self.path}/save-image", json={"name": name}, timeout=timeout)

    async def set_net_policy(
        self, default: str = "public", allow_hosts: list[str] | None = None, allow_cidrs: list[str] | None = None
    ) -> AsyncSandbox:
        """Replace its egress policy; new connections follow it at once."""
        policy = {"default": default, "allow_hosts": allow_hosts or [], "allow_cidrs": allow_cidrs or []}
        self.info = await self.kiln.json("PATCH", self.path, json={"net_policy": policy})
        return self

    @property
    def net_policy(self) -> dict:
        return self.info.get("net_policy", {})

    async def stop(self, timeout: float = 300.0) -> AsyncSandbox:
        """Snapshot to disk and free its memory (the next request wakes it)."""
        self.info = await self.kiln.json("POST", f"{self.path}/stop", timeout=timeout)
        return self

    async def start(self, force: bool = False, timeout: float = 300.0) -> AsyncSandbox:
        self.info = await self.kiln.json("POST", f"{self.path}/start", json={"force": force}, timeout=timeout)
        return self

    async def destroy(self) -> None:
        await self.kiln.json("DELETE", self.path)

    async def sessions(self) -> list[dict]:
        return await self.kiln.json("GET", f"{self.path}/sessions")

    async def ports(self) -> list[dict]:
        return await self.kiln.json("GET", f"{self.path}/ports")

    async def publish(self, port: int, alias: str | None = None) -> dict:
        """Make a port public at http://<alias>.<domain>/; returns the rule with its `url`."""
        body = {"port": port} if alias is None else {"port": port, "alias": alias}
        return await self.kiln.json("POST", f"{self.path}/publish", json=body)

    async def published(self) -> list[dict]:
        return await self.kiln.json("GET", f"{self.path}/publish")

    async def unpublish(self, port: int) -> None:
        await self.kiln.request("DELETE", f"{self.path}/publish/{port}")

    def pty(
        self, session: str | None = None, new: bool = False, rows: int | None = None, cols: int | None = None
    ) -> AsyncPty:
        """An interactive terminal: `async with sb.pty() as term: await term.send(b"ls\\n")`."""
        return AsyncPty(self, session, new, rows, cols)


class AsyncCommands:
    def __init__(self, sandbox: AsyncSandbox):
        self.sandbox = sandbox

    async def run(
        self,
        cmd: str | list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
    ) -> CommandResult:
        """Run a command to completion. With on_stdout/on_stderr the output streams to them as it comes."""
        body: dict[str, Any] = {"cmd": _argv(cmd)}
        for key, value in (("env", env), ("cwd", cwd), ("user", user), ("stdin", stdin)):
            if value is not None:
                body[key] = value
        if timeout is not None:
            body["timeout_sec"] = max(1, int(timeout))
        http_timeout = (timeout or 300) + 60
        if on_stdout is None and on_stderr is None:
            d = await self.sandbox.kiln.json("POST", f"{self.sandbox.path}/exec", json=body, timeout=http_timeout)
            return CommandResult(d["exit_code"], d["stdout"], d["stderr"], bool(d.get("timed_out")))
        out: list[str] = []
        err: list[str] = []
        async for event in self.stream(body, http_timeout):
            kind = event["type"]
            if kind in ("stdout", "stderr"):
                (out if kind == "stdout" else err).append(event["data"])
                callback = on_stdout if kind == "stdout" else on_stderr
                if callback is not None:
                    callback(event["data"])
            elif kind == "exit":
                return CommandResult(event["exit_code"], "".join(out), "".join(err), bool(event.get("timed_out")))
            elif kind == "error":
                raise KilnError(event.get("data", "exec failed"))
        raise KilnError("the command's stream ended without an exit status")

    async def stream(self, body: dict, timeout: float) -> AsyncIterator[dict]:
        kiln = self.sandbox.kiln
        try:
            async with kiln.http.stream(
                "POST", f"{self.sandbox.path}/exec", json=body, timeout=timeout, headers={"Accept": NDJSON}
            ) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise_for(r)
                async for line in r.aiter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TimeoutException as e:
            raise Timeout("the command's output stopped arriving") from e


class AsyncFiles:
    def __init__(self, sandbox: AsyncSandbox):
        self.sandbox = sandbox

    @property
    def path(self) -> str:
        return f"{self.sandbox.path}/files"

    async def read(self, path: str) -> bytes:
        return (await self.sandbox.kiln.request("GET", self.path, params={"path": path})).content

    async def read_text(self, path: str) -> str:
        return (await self.read(path)).decode()

    async def write(self, path: str, data: bytes | str, mode: str | None = None) -> None:
        """Write a whole file atomically (parents are created, owned by the sandbox user)."""
        params = {"path": path} | ({"mode": mode} if mode else {})
        content = data.encode() if isinstance(data, str) else data
        await self.sandbox.kiln.request("PUT", self.path, params=params, content=content)

    async def stat(self, path: str) -> dict:
        r = await self.sandbox.kiln.request("HEAD", self.path, params={"path": path})
        return {
            "size": int(r.headers["x-file-size"]),
            "mode": r.headers["x-file-mode"],
            "is_dir": r.headers["x-file-isdir"] == "true",
        }

    async def list(self, path: str) -> list[dict]:
        return await self.sandbox.kiln.json("GET", self.path, params={"path": path, "ls": "true"})


class AsyncPty:
    """A terminal session over the WebSocket: send keystrokes, receive output bytes."""

    def __init__(self, sandbox: AsyncSandbox, session: str | None, new: bool, rows: int | None, cols: int | None):
        self.sandbox, self.session, self.new, self.size = sandbox, session, new, (rows, cols)
        self.ws: ClientConnection | None = None
        self.session_id: str | None = None

    async def __aenter__(self) -> AsyncPty:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> AsyncPty:
        kiln = self.sandbox.kiln
        url = kiln.url.replace("http://", "ws://").replace("https://", "wss://") + f"{self.sandbox.path}/ws"
        query = [f"session={self.session}"] if self.session else []
        if self.new:
            query.append("new=true")
        if query:
            url += "?" + "&".join(query)
        self.ws = ws = await ws_connect(
            url, additional_headers={"Authorization": f"Bearer {kiln.token}"}, max_size=None, proxy=None
        )
        first = json.loads(await ws.recv())
        if first.get("type") == "error":
            raise KilnError(first.get("error", "terminal failed"))
        self.session_id = first.get("session_id")
        rows, cols = self.size
        if rows and cols:
            await self.resize(rows, cols)
        return self

    def connected(self) -> ClientConnection:
        if self.ws is None:
            raise KilnError("the terminal is not open")
        return self.ws

    async def send(self, data: bytes | str) -> None:
        await self.connected().send(data.encode() if isinstance(data, str) else data)

    async def resize(self, rows: int, cols: int) -> None:
        await self.connected().send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next chunk of output; b"" once the session has ended."""
        try:
            data = await asyncio.wait_for(self.connected().recv(), timeout)
        except ConnectionClosed:
            return b""
        except TimeoutError as e:
            raise Timeout("no terminal output in time") from e
        return data if isinstance(data, bytes) else data.encode()

    async def read_until(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        """Output up to and including `marker` (raises Timeout if it does not appear)."""
        marker = marker.encode() if isinstance(marker, str) else marker
        buf = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while marker not in buf:
            chunk = await self.recv(timeout=max(0.01, deadline - loop.time()))
            if not chunk:
                raise KilnError("the terminal closed before the expected output")
            buf += chunk
        return buf

    async def close(self) -> None:
        """Detach (the shell keeps running and can be attached again)."""
        if self.ws is not None:
            await self.ws.close()


class AsyncSecrets:
    def __init__(self, kiln: AsyncKiln):
        self.kiln = kiln

    async def set(self, name: str, value: str) -> dict:
        return await self.kiln.json("POST", "/secrets", json={"name": name, "value": value})

    async def list(self) -> list[dict]:
        return await self.kiln.json("GET", "/secrets")

    async def delete(self, name: str) -> None:
        await self.kiln.json("DELETE", f"/secrets/{name}")


class AsyncVolumes:
    def __init__(self, kiln: AsyncKiln):
        self.kiln = kiln

    async def create(self, name: str, size_mb: int | None = None) -> dict:
        body = {"name": name} | ({"size_mb": size_mb} if size_mb else {})
        return await self.kiln.json("POST", "/volumes", json=body)

    async def list(self) -> list[dict]:
        return await self.kiln.json("GET", "/volumes")

    async def get(self, name: str) -> dict:
        return await self.kiln.json("GET", f"/volumes/{name}")

    async def delete(self, name: str) -> None:
        await self.kiln.json("DELETE", f"/volumes/{name}")


class AsyncSnapshots:
    """Named snapshots: copies of sandboxes (memory and disk) to resume from, any number of times."""

    def __init__(self, kiln: AsyncKiln):
        self.kiln = kiln

    async def list(self) -> list[dict]:
        return await self.kiln.json("GET", "/snapshots")

    async def get(self, name: str) -> dict:
        return await self.kiln.json("GET", f"/snapshots/{name}")

    async def resume(self, name: str, sandbox_name: str | None = None, timeout: float = 300.0) -> AsyncSandbox:
        body = {"name": sandbox_name} if sandbox_name else {}
        return AsyncSandbox(
            self.kiln, await self.kiln.json("POST", f"/snapshots/{name}/resume", json=body, timeout=timeout)
        )

    async def delete(self, name: str) -> None:
        await self.kiln.json("DELETE", f"/snapshots/{name}")


class AsyncTemplates:
    def __init__(self, kiln: AsyncKiln):
        self.kiln = kiln

    async def create(self, name: str, **spec) -> dict:
        return await self.kiln.json("POST", "/templates", json={"name": name, **spec})

    async def list(self) -> list[dict]:
        return await self.kiln.json("GET", "/templates")

    async def get(self, id_or_name: str) -> dict:
        return await self.kiln.json("GET", f"/templates/{id_or_name}")

    async def delete(self, id_or_name: str) -> None:
        await self.kiln.json("DELETE", f"/templates/{id_or_name}")


async def file_chunks(path: str | os.PathLike, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


class AsyncImages:
    """Images: the built-in ones and your own (imported from an archive, built from a Dockerfile,
    saved from a sandbox). A sandbox names one with `image=` on create."""

    def __init__(self, kiln: AsyncKiln):
        self.kiln = kiln

    async def list(self) -> list[dict]:
        return await self.kiln.json("GET", "/images")

    async def get(self, name: str) -> dict:
        return await self.kiln.json("GET", f"/images/{name}")

    async def delete(self, name: str) -> None:
        await self.kiln.json("DELETE", f"/images/{name}")

    async def import_archive(self, name: str, path: str | os.PathLike, timeout: float = 3600.0) -> dict:
        """Import a `docker save` tarball, an OCI-layout archive or a root filesystem tar (streamed)."""
        size = os.path.getsize(path)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return await self.kiln.json(
            "POST",
            "/images/import",
            params={"name": name},
            content=file_chunks(path),
            headers=headers,
            timeout=timeout,
        )

    async def build(
        self,
        name: str,
        context: str | os.PathLike,
        dockerfile: str | None = None,
        on_event: Callable[[dict], Any] | None = None,
        timeout: float = 3600.0,
    ) -> dict:
        """Build an image from the Dockerfile in the `context` directory (or `dockerfile`, a path
        relative to it); on_event sees every log event as it arrives. Returns the new image; raises
        BuildFailed with the failing step's message and exit code."""
        with tempfile.TemporaryDirectory() as tmp:
            tar_path = Path(tmp) / "context.tar"
            await asyncio.to_thread(pack_context, Path(context), tar_path)
            params = {"name": name} | ({"dockerfile": dockerfile} if dockerfile else {})
            headers = {"Content-Length": str(tar_path.stat().st_size), "Accept": NDJSON}
            try:
                async with self.kiln.http.stream(
                    "POST",
                    "/images/build",
                    params=params,
                    content=file_chunks(tar_path),
                    headers=headers,
                    timeout=timeout,
                ) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise_for(r)
                    async for line in r.aiter_lines():
                        if not line:
                            continue
                        event = json.loads(line)
                        if on_event is not None:
                            on_event(event)
                        if event["type"] == "done":
                            return event["image"]
                        if event["type"] == "error":
                            raise BuildFailed(event["error"], event.get("exit_code"))
            except httpx.TimeoutException as e:
                raise Timeout("the build's log stopped arriving") from e
        raise KilnError("the build's log ended without a result")


def pack_context(directory: Path, target: Path) -> None:
    """The build context: every file under the directory, paths relative to it."""
    if not directory.is_dir():
        raise KilnError(f"{directory} is not a directory")
    with tarfile.open(target, "w") as tar:
        for child in sorted(directory.iterdir()):
            tar.add(child, arcname=child.name)
