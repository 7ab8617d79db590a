"""The client commands of `kiln` (everything but serve, image prepare and user), built on the SDK."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys

import typer
from rich.console import Console
from rich.table import Table

from ..client import KilnError
from ..client.aio import AsyncKiln, AsyncSandbox
from . import fast
from .server import app, client_settings, fail, image_app

JsonOpt = typer.Option(False, "--json", help="print JSON instead of text")
console = Console()
secret_app = typer.Typer(help="Secrets: values injected as env vars into new sandboxes.", no_args_is_help=True)
volume_app = typer.Typer(help="Volumes: persistent, size-capped filesystems.", no_args_is_help=True)
template_app = typer.Typer(help="Templates: saved create requests.", no_args_is_help=True)
snapshot_app = typer.Typer(help="Named snapshots: copies of sandboxes to resume from.", no_args_is_help=True)
file_app = typer.Typer(help="Files inside a sandbox.", no_args_is_help=True)
for sub, name in (
    (secret_app, "secret"),
    (volume_app, "volume"),
    (template_app, "template"),
    (file_app, "file"),
    (snapshot_app, "snapshot"),
):
    app.add_typer(sub, name=name)


def hot_verb(fn, *args):
    """Run one of the verbs fast.py implements (the same code `kiln` runs without Typer)."""
    try:
        return fn(fast.Api(*client_settings()), *args)
    except fast.Failed as e:
        raise fail(str(e)) from None


def run(coro_fn):
    """Run coro_fn(kiln) with a client; API errors become a red message and exit status 1."""

    async def go():
        url, token = client_settings()
        async with AsyncKiln(url, token) as kiln:
            return await coro_fn(kiln)

    try:
        return asyncio.run(go())
    except KilnError as e:
        raise fail(e.message if e.status else str(e))


def emit(data, as_json: bool, text=None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    elif text is not None:
        text(data)
    else:
        typer.echo(data if isinstance(data, str) else json.dumps(data, indent=2))


def table(rows: list[dict], columns: list[str]) -> None:
    t = Table(*[c.upper() for c in columns], box=None, header_style="bold")
    for r in rows:
        t.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in columns])
    console.print(t)


def delete_and_say(name: str, as_json: bool, delete) -> None:
    run(delete)
    emit({"status": "deleted"}, as_json, lambda d: typer.echo(f"deleted {name}"))


def kv(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise fail(f"{what} must be KEY=VALUE: {p!r}")
        k, v = p.split("=", 1)
        out[k] = v
    return out


# ---------------------------------------------------------------- sandboxes


@app.command()
def create(
    name: str | None = typer.Argument(None),
    name_option: str | None = typer.Option(None, "--name", help="the name (as docker and bhatti take it)"),
    image: str | None = typer.Option(None, "--image", help="an image name (`kiln image list`; default: default)"),
    cpus: float | None = typer.Option(None),
    memory: int | None = typer.Option(None, help="MB"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE (repeat)"),
    init: str | None = typer.Option(None, help="script run once after boot (session `init`)"),
    keep_hot: bool | None = typer.Option(None, "--keep-hot/--allow-cold"),
    template: str | None = typer.Option(None, help="template id or name"),
    secret: list[str] = typer.Option([], "--secret", help="secret name (repeat)"),
    volume: list[str] = typer.Option([], "--volume", "-v", help="NAME:/mount[:ro] (repeat)"),
    egress: str | None = typer.Option(None, "--egress", help="public | deny (default: the daemon's)"),
    allow_host: list[str] = typer.Option([], "--allow-host", help="with --egress deny: a name or *.suffix (repeat)"),
    allow_cidr: list[str] = typer.Option([], "--allow-cidr", help="with --egress deny: an IPv4 CIDR (repeat)"),
    as_json: bool = JsonOpt,
):
    """Create a sandbox (or show the existing one of that name)."""
    if name and name_option and name != name_option:
        raise fail(f"two names given: {name!r} and --name {name_option!r}")
    name = name or name_option
    volumes = []
    for spec in volume:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "ro"):
            raise fail(f"--volume must be NAME:/mount[:ro]: {spec!r}")
        volumes.append({"name": parts[0], "mount": parts[1], "read_only": len(parts) == 3})

    async def go(kiln):
        with console.status("creating sandbox...", spinner="dots") if not as_json else _nothing():
            sb = await kiln.sandboxes.create(
                name,
                image=image,
                cpus=cpus,
                memory_mb=memory,
                env=kv(env, "--env") or None,
                init=init,
                keep_hot=keep_hot,
                template=template,
                secrets=secret or None,
                volumes=volumes or None,
                net_policy=policy_of(egress, allow_host, allow_cidr),
            )
        return sb.info

    emit(run(go), as_json, lambda d: typer.echo(f"{d['name']}\t{d['id']}\t{d['status']}\t{d['ip']}"))


def policy_of(egress: str | None, hosts: list[str], cidrs: list[str]) -> dict | None:
    if egress is None and not hosts and not cidrs:
        return None
    return {"default": egress or "deny", "allow_hosts": hosts, "allow_cidrs": cidrs}


@app.command()
def fork(source: str, name: str | None = typer.Argument(None), as_json: bool = JsonOpt):
    """Copy a sandbox at this instant, memory and processes included (the source keeps running)."""

    async def go(kiln):
        body = {"from": source} | ({"name": name} if name else {})
        return await kiln.json("POST", "/sandboxes", json=body, timeout=300)

    out = run(go)
    emit(
        out,
        as_json,
        lambda d: typer.echo(f"{d['name']}\t{d['id']}\t{d['ip']}\t(source paused {d['fork']['paused_ms']} ms)"),
    )


@app.command()
def net(
    sandbox: str,
    egress: str | None = typer.Option(None, "--egress", help="public | deny"),
    allow_host: list[str] = typer.Option([], "--allow-host", help="a name or *.suffix (repeat)"),
    allow_cidr: list[str] = typer.Option([], "--allow-cidr", help="an IPv4 CIDR (repeat)"),
    as_json: bool = JsonOpt,
):
    """Show a sandbox's egress policy, or replace it (kiln net dev --egress deny --allow-host example.com)."""
    policy = policy_of(egress, allow_host, allow_cidr)

    async def go(kiln):
        if policy is None:
            return (await kiln.json("GET", f"/sandboxes/{sandbox}"))["net_policy"]
        return (await kiln.json("PATCH", f"/sandboxes/{sandbox}", json={"net_policy": policy}))["net_policy"]

    def text(p: dict) -> None:
        typer.echo(f"egress: {p['default']}")
        for h in p["allow_hosts"]:
            typer.echo(f"  allow host {h}")
        for c in p["allow_cidrs"]:
            typer.echo(f"  allow cidr {c}")

    emit(run(go), as_json, text)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@app.command("list")
def list_(as_json: bool = JsonOpt):
    """Your sandboxes."""
    hot_verb(fast.list_sandboxes, as_json)


app.command("ls", hidden=True)(list_)


@app.command()
def inspect(sandbox: str, as_json: bool = JsonOpt):
    """One sandbox, in full."""
    hot_verb(fast.inspect_sandbox, sandbox)


@app.command()
def edit(
    sandbox: str,
    name: str | None = typer.Option(None, "--name"),
    keep_hot: bool | None = typer.Option(None, "--keep-hot/--allow-cold"),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE (repeat)"),
    label_delete: list[str] = typer.Option([], "--label-delete"),
    as_json: bool = JsonOpt,
):
    """Rename, (un)pin hot, or label a sandbox."""

    async def go(kiln):
        sb = await AsyncSandbox.connect(sandbox, kiln)
        await sb.update(
            name=name, keep_hot=keep_hot, labels=kv(label, "--label") or None, remove_labels=label_delete or None
        )
        return sb.info

    emit(run(go), as_json, lambda d: typer.echo(f"{d['name']}\t{d['status']}\tkeep_hot={d['keep_hot']}"))


@app.command()
def stop(sandbox: str, as_json: bool = JsonOpt):
    """Snapshot to disk and free its memory."""

    async def go(kiln):
        with console.status(f"stopping {sandbox}...") if not as_json else _nothing():
            return (await (await AsyncSandbox.connect(sandbox, kiln)).stop()).info

    emit(run(go), as_json, lambda d: typer.echo(f"{d['name']}\t{d['status']}"))


@app.command()
def start(
    sandbox: str,
    force: bool = typer.Option(False, "--force", help="boot on its disk if the restore fails"),
    as_json: bool = JsonOpt,
):
    """Bring a stopped sandbox back (memory intact)."""

    async def go(kiln):
        return (await (await AsyncSandbox.connect(sandbox, kiln)).start(force=force)).info

    emit(run(go), as_json, lambda d: typer.echo(f"{d['name']}\t{d['status']}"))


@app.command()
def destroy(sandbox: str, yes: bool = typer.Option(False, "-y", "--yes", help="do not ask"), as_json: bool = JsonOpt):
    """Destroy a sandbox and its disk (volumes stay)."""
    if not yes and not as_json and sys.stdin.isatty():
        typer.confirm(f"destroy {sandbox}?", abort=True)
    run(lambda k: k.json("DELETE", f"/sandboxes/{sandbox}"))
    emit({"status": "destroyed"}, as_json, lambda d: typer.echo(f"destroyed {sandbox}"))


app.command("rm", hidden=True)(destroy)


@app.command("exec")
def exec_(
    sandbox: str,
    cmd: list[str] = typer.Argument(..., help="the command: kiln exec dev -- ls -la"),
    timeout: int | None = typer.Option(None, help="seconds"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE"),
    cwd: str | None = typer.Option(None),
    user: str | None = typer.Option(None),
    as_json: bool = JsonOpt,
    detach: bool = typer.Option(False, "--detach", help="start it in the background; prints its pid and log file"),
):
    """Run a command; exits with its exit code. Output streams when stdout is a terminal."""
    code = hot_verb(
        fast.exec_command, sandbox, list(cmd), timeout, kv(env, "--env") or None, cwd, user, as_json, detach
    )
    raise typer.Exit(code)


@app.command()
def shell(
    sandbox: str,
    new: bool = typer.Option(False, "--new", help="a new shell instead of reattaching"),
    session: str | None = typer.Option(None, help="attach to this session id"),
):
    """An interactive shell. Ctrl+\\ detaches (the shell keeps running; run `kiln shell` again to return)."""
    from .shell import interactive_shell

    async def go(kiln):
        return await interactive_shell(AsyncSandbox(kiln, {"id": sandbox, "name": sandbox, "status": ""}), session, new)

    how = run(go)
    typer.echo(f"\r\n[{how}]" if how == "detached" else "", err=True)


@app.command()
def ps(sandbox: str, as_json: bool = JsonOpt):
    """Sessions (shells, init) in a sandbox."""
    rows = run(lambda k: k.json("GET", f"/sandboxes/{sandbox}/sessions"))
    # the API names a session's command line `argv` (bhatti's SessionInfo); the table says COMMAND
    emit(
        rows,
        as_json,
        lambda d: table(
            [{**s, "command": s.get("argv")} for s in d], ["session_id", "command", "running", "attached", "exit_code"]
        ),
    )


@app.command()
def ports(sandbox: str | None = typer.Argument(None), as_json: bool = JsonOpt):
    """Listening ports (of one sandbox, which wakes it; or of all, from the last scan)."""
    path = f"/sandboxes/{sandbox}/ports" if sandbox else "/ports"
    rows = run(lambda k: k.json("GET", path))
    cols = ["container_port", "host_port", "proxy_url"] if sandbox else ["sandbox_id", "container_port", "host_port"]
    emit(rows, as_json, lambda d: table(d, cols))


@app.command()
def publish(
    sandbox: str,
    port: int = typer.Option(..., "--port", "-p"),
    alias: str | None = typer.Option(None, "--alias", "-a"),
    as_json: bool = JsonOpt,
):
    """Make a port public at http://<alias>.<domain>/ (no auth)."""
    rule = run(
        lambda k: k.json(
            "POST", f"/sandboxes/{sandbox}/publish", json={"port": port} | ({"alias": alias} if alias else {})
        )
    )
    emit(rule, as_json, lambda d: typer.echo(d["url"]))


@app.command()
def unpublish(sandbox: str, port: int = typer.Option(..., "--port", "-p"), as_json: bool = JsonOpt):
    """Remove a port's public URL."""
    run(lambda k: k.request("DELETE", f"/sandboxes/{sandbox}/publish/{port}"))
    emit({"status": "unpublished"}, as_json, lambda d: typer.echo(f"unpublished port {port}"))


# ---------------------------------------------------------------- files


@file_app.command("read")
def file_read(sandbox: str, path: str):
    """Print a file's bytes to stdout."""
    hot_verb(fast.read_file, sandbox, path)


@file_app.command("write")
def file_write(
    sandbox: str,
    path: str,
    source: str | None = typer.Option(None, "--from", help="local file (default: stdin)"),
    mode: str | None = typer.Option(None, help="octal, e.g. 0755"),
    as_json: bool = JsonOpt,
):
    """Write stdin (or --from FILE) to a file, atomically; a progress bar for large files."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    if source is None:
        data = sys.stdin.buffer.read()
        return hot_verb(fast.write_file, sandbox, path, io.BytesIO(data), len(data), mode, as_json)
    f = open(source, "rb")  # noqa: SIM115 (closed by the process exit)
    size = os.fstat(f.fileno()).st_size
    show = size > fast.PROGRESS_ABOVE and not as_json and sys.stderr.isatty()
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, disable=not show, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"upload {os.path.basename(source)}", total=size)

        class Counted(io.RawIOBase):
            def read(self, n: int = -1) -> bytes:
                chunk = f.read(n)
                bar.update(task, advance=len(chunk))
                return chunk

        hot_verb(fast.write_file, sandbox, path, Counted(), size, mode, as_json)


@file_app.command("ls")
def file_ls(sandbox: str, path: str, as_json: bool = JsonOpt):
    """List a directory."""
    rows = run(lambda k: k.json("GET", f"/sandboxes/{sandbox}/files", params={"path": path, "ls": "true"}))
    emit(rows, as_json, lambda d: table(d, ["name", "size", "mode", "is_dir"]))


# ---------------------------------------------------------------- secrets, volumes, templates


@secret_app.command("set")
def secret_set(
    name: str, value: str | None = typer.Option(None, help="default: read from stdin"), as_json: bool = JsonOpt
):
    """Create or replace a secret (the value is read from stdin unless --value is given)."""
    value = value if value is not None else sys.stdin.read().rstrip("\n")
    emit(run(lambda k: k.secrets.set(name, value)), as_json, lambda d: typer.echo(f"set {d['name']}"))


@secret_app.command("list")
def secret_list(as_json: bool = JsonOpt):
    emit(run(lambda k: k.secrets.list()), as_json, lambda d: table(d, ["name", "created_at", "updated_at"]))


@secret_app.command("delete")
def secret_delete(name: str, as_json: bool = JsonOpt):
    delete_and_say(name, as_json, lambda k: k.secrets.delete(name))


@volume_app.command("create")
def volume_create(
    name: str, size: int | None = typer.Option(None, "--size", help="MB (default 1024)"), as_json: bool = JsonOpt
):
    emit(run(lambda k: k.volumes.create(name, size)), as_json, lambda d: typer.echo(f"{d['name']}\t{d['size_mb']} MB"))


@volume_app.command("list")
def volume_list(as_json: bool = JsonOpt):
    def text(rows):
        table(
            [dict(r, attached=len(r.get("attachments") or [])) for r in rows],
            ["name", "size_mb", "attached", "created_at"],
        )

    emit(run(lambda k: k.volumes.list()), as_json, text)


@volume_app.command("delete")
def volume_delete(name: str, as_json: bool = JsonOpt):
    delete_and_say(name, as_json, lambda k: k.volumes.delete(name))


@template_app.command("create")
def template_create(
    name: str,
    cpus: float | None = typer.Option(None),
    memory: int | None = typer.Option(None, help="MB"),
    env: list[str] = typer.Option([], "--env", "-e"),
    init: str = typer.Option(""),
    secret: list[str] = typer.Option([], "--secret"),
    keep_hot: bool = typer.Option(False),
    as_json: bool = JsonOpt,
):
    spec = {
        "cpus": cpus,
        "memory_mb": memory,
        "env": kv(env, "--env"),
        "init": init,
        "secrets": secret,
        "keep_hot": keep_hot,
    }
    emit(
        run(lambda k: k.templates.create(name, **{k2: v for k2, v in spec.items() if v is not None})),
        as_json,
        lambda d: typer.echo(f"{d['name']}\t{d['id']}"),
    )


@template_app.command("list")
def template_list(as_json: bool = JsonOpt):
    emit(run(lambda k: k.templates.list()), as_json, lambda d: table(d, ["name", "id", "cpus", "memory_mb"]))


@template_app.command("delete")
def template_delete(template: str, as_json: bool = JsonOpt):
    delete_and_say(template, as_json, lambda k: k.templates.delete(template))


# ---------------------------------------------------------------- named snapshots


@snapshot_app.command("create")
def snapshot_create(sandbox: str, name: str, as_json: bool = JsonOpt):
    """Keep a copy of a sandbox (memory and disk) under a name; the sandbox keeps running."""
    snap = run(lambda k: k.json("POST", f"/sandboxes/{sandbox}/checkpoint", json={"name": name}, timeout=300))
    emit(snap, as_json, lambda d: typer.echo(f"{d['name']}\t{d['size_mb']} MB\t(paused {d['paused_ms']} ms)"))


@snapshot_app.command("list")
def snapshot_list(as_json: bool = JsonOpt):
    """Your snapshots."""
    rows = run(lambda k: k.json("GET", "/snapshots"))
    emit(rows, as_json, lambda d: fast.print_table(d, ["name", "source_sandbox", "size_mb", "created_at"]))


@snapshot_app.command("resume")
def snapshot_resume(name: str, sandbox_name: str | None = typer.Argument(None), as_json: bool = JsonOpt):
    """A new sandbox from a snapshot."""
    body = {"name": sandbox_name} if sandbox_name else {}
    sb = run(lambda k: k.json("POST", f"/snapshots/{name}/resume", json=body, timeout=300))
    emit(sb, as_json, lambda d: typer.echo(f"{d['name']}\t{d['id']}\t{d['ip']}"))


@snapshot_app.command("delete")
def snapshot_delete(name: str, as_json: bool = JsonOpt):
    delete_and_say(name, as_json, lambda k: k.json("DELETE", f"/snapshots/{name}"))


# ------------------------------------------------------------ images


def image_row(d: dict) -> dict:
    return {**d, "status": d["status"] + (f" ({d['progress']})" if d.get("progress") else "")}


@image_app.command("list")
def image_list(as_json: bool = JsonOpt):
    """The built-in images and your own."""
    rows = run(lambda k: k.images.list())
    emit(
        rows, as_json, lambda d: table([image_row(i) for i in d], ["name", "source", "status", "size_mb", "created_at"])
    )


@image_app.command("import")
def image_import(name: str, archive: str, as_json: bool = JsonOpt):
    """Import a `docker save` tarball, an OCI-layout archive or a root filesystem tar as image NAME."""
    if not os.path.isfile(archive):
        raise fail(f"{archive}: no such file")
    image = run(lambda k: k.images.import_archive(name, archive))
    emit(image, as_json, lambda d: typer.echo(f"{d['name']}\t{d['size_mb']} MB"))


@image_app.command("build")
def image_build(
    context: str = typer.Argument(".", help="the build context directory"),
    tag: str = typer.Option(..., "-t", "--tag", help="the new image's name"),
    dockerfile: str | None = typer.Option(None, "-f", "--file", help="the Dockerfile, relative to the context"),
    as_json: bool = JsonOpt,
):
    """Build an image from a Dockerfile, showing each step and its output as it runs."""

    def show(event: dict) -> None:
        if as_json:
            typer.echo(json.dumps(event))
        elif event["type"] == "step":
            cached = "  (cached)" if event["cached"] else ""
            typer.secho(f"[{event['n']}/{event['of']}] {event['instruction']}{cached}", bold=True)
        elif event["type"] in ("stdout", "stderr"):
            typer.echo(event["data"], nl=False, err=event["type"] == "stderr")
        elif event["type"] == "done":
            d = event["image"]
            typer.echo(
                f"built {d['name']} ({d['size_mb']} MB) in {event['seconds']} s, "
                f"{event['cached_steps']}/{event['steps']} steps from the cache"
            )

    run(lambda k: k.images.build(tag, context, dockerfile, on_event=show))


@image_app.command("save")
def image_save(sandbox: str, name: str, as_json: bool = JsonOpt):
    """Save a sandbox's root disk as image NAME (the sandbox keeps running)."""
    image = run(lambda k: k.json("POST", f"/sandboxes/{sandbox}/save-image", json={"name": name}, timeout=1800))
    emit(image, as_json, lambda d: typer.echo(f"{d['name']}\t{d['size_mb']} MB"))


@image_app.command("delete")
def image_delete(name: str, as_json: bool = JsonOpt):
    delete_and_say(name, as_json, lambda k: k.images.delete(name))
