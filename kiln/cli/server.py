"""The `kiln` command: the Typer app, how the client finds the daemon, and the server-host commands.

On the server host: `kiln serve`, `kiln image prepare`, `kiln user ...` (they read config.yaml).
Everywhere else it is a client of the API, built on the SDK: `kiln create`, `kiln exec`, `kiln shell`,
... Sandboxes are named by name or id. Every client command takes `--json`.

The client finds the daemon and key from --url/--token, else $KILN_URL/$KILN_TOKEN, else
~/.kiln/config.yaml (written by `kiln setup`), else http://127.0.0.1:8080 and, on the server host
as root, the admin key in <data_dir>/admin.token.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import typer
import yaml

from .. import __version__
from ..config import ConfigError, load_config
from ..fileio import write_atomic
from .settings import CLIENT_CONFIG, client_settings as settings_from

app = typer.Typer(
    name="kiln",
    help="kiln: isolated Linux sandboxes behind an API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
image_app = typer.Typer(
    help="Images: built in, imported, built from a Dockerfile or saved from a sandbox.", no_args_is_help=True
)
user_app = typer.Typer(help="API users and keys (server host).", no_args_is_help=True)
e2b_app = typer.Typer(help="The E2B-compatible API (server host).", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(user_app, name="user")
app.add_typer(e2b_app, name="e2b")

ConfigOpt = typer.Option(None, "--config", help="config.yaml (default: $KILN_CONFIG, then /etc/kiln/config.yaml)")


class Settings:
    url: str | None = None
    token: str | None = None


settings = Settings()


@app.callback()
def main_options(
    url: str | None = typer.Option(None, "--url", help="daemon URL (default $KILN_URL)"),
    token: str | None = typer.Option(None, "--token", help="API key (default $KILN_TOKEN)"),
    version: bool = typer.Option(False, "--version", is_eager=True, help="print kiln's version and exit"),
):
    if version:
        typer.echo(f"kiln {__version__}")
        raise typer.Exit()
    settings.url, settings.token = url, token


def client_settings() -> tuple[str, str]:
    return settings_from(settings.url, settings.token)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"kiln: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


# ---------------------------------------------------------------- server host


@app.command()
def serve(config: str | None = ConfigOpt):
    """Run the daemon (HTTP API, thermal manager, proxy) in the foreground."""
    import uvicorn

    from ..api.edge import GuardedHttpTools, RedactTokens
    from ..app import build_app

    cfg = load_or_exit(config)
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactTokens())
    raise_open_files_limit()
    app = build_app(cfg)
    common = dict(
        log_level=cfg.log_level,
        log_config=None,  # our handlers (with the token filter) for uvicorn's loggers too
        http=GuardedHttpTools.configure(cfg.server),
        ws_max_size=cfg.server.ws_max_message_bytes,
        limit_concurrency=cfg.server.max_connections,
        access_log=False,
        timeout_graceful_shutdown=10,
        # proxied responses carry the app's own Date and Server; the API adds Date itself
        server_header=False,
        date_header=False,
        # the client address is the socket's: a forged X-Forwarded-For must not dodge rate limits
        proxy_headers=False,
        # longer than clients keep idle connections (httpx: 5 s), so a client never reuses
        # a connection the server is closing at that very moment
        timeout_keep_alive=65,
    )
    main = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, **common))
    tls = e2b_tls_server(cfg, app, common)
    asyncio.run(serve_all(main, tls))


def e2b_tls_server(cfg, app, common: dict):
    """E2B's domain mode on its TLS listener, once `kiln e2b setup` made its certificate."""
    import uvicorn

    from ..e2b.tls import tls_files

    files = tls_files(cfg.data_dir)
    if not cfg.e2b.enabled or not (cfg.e2b.domain or files.domain()):
        return None
    host, _, port = cfg.e2b.tls_listen.rpartition(":")
    config = uvicorn.Config(
        app,
        host=host or "0.0.0.0",
        port=int(port),
        ssl_certfile=str(files.cert),
        ssl_keyfile=str(files.key),
        lifespan="off",  # the main listener's server runs the app's start-up and shut-down
        **common,
    )
    return uvicorn.Server(config)


async def serve_all(main, tls) -> None:
    """The main listener, and beside it the TLS one from when the app has started until it stops."""
    if tls is None:
        return await main.serve()
    task = asyncio.create_task(main.serve())
    while not main.started and not task.done():  # noqa: ASYNC110 (uvicorn has a flag, no event)
        await asyncio.sleep(0.05)
    if task.done():
        return await task
    tls_task = asyncio.create_task(tls._serve())  # no signal handlers of its own: the main server's stop it
    try:
        await task
    finally:
        tls.should_exit = True
        await tls_task


def raise_open_files_limit() -> None:
    """Up to the hard limit: relays, proxied connections and sandboxes' sockets all take descriptors;
    the server's own caps (server.max_connections, limits.max_ports_per_sandbox) stay well below it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def load_or_exit(path: str | None):
    try:
        return load_config(path)
    except ConfigError as e:
        raise fail(str(e), 2)


@image_app.command("prepare")
def image_prepare(
    names: list[str] = typer.Argument(None, help="built-in images to build (default: all of them)"),
    config: str | None = ConfigOpt,
):
    """(server host) Build the built-in images this machine does not have yet, with progress, and the
    agent's Python runtime. The daemon builds missing ones in the background too."""
    from ..images.builder import ImageBuildError, ensure_built
    from ..images.recipes import BUILTIN
    from ..images.runtime import ensure_runtime

    cfg = load_or_exit(config)
    unknown = [n for n in names or [] if n not in BUILTIN]
    if unknown:
        raise fail(f"unknown built-in image {unknown[0]!r} (built in: {', '.join(BUILTIN)})", 2)
    ensure_runtime(cfg.image_root)
    for name in names or list(BUILTIN):
        try:
            path = ensure_built(BUILTIN[name], cfg.image_root, lambda line: typer.echo(f"[image] {line}", err=True))
        except ImageBuildError as e:
            raise fail(str(e), 1)
        typer.echo(f"{name}: {path}")


def open_store(config: str | None):
    from ..store.db import Store

    cfg = load_or_exit(config)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    return cfg, Store(cfg.data_dir / "state.db")


@user_app.command("create")
def user_create(
    name: str,
    max_sandboxes: int | None = typer.Option(None),
    max_cpus: float | None = typer.Option(None, help="per sandbox"),
    max_memory: int | None = typer.Option(None, help="MB per sandbox"),
    max_volume_storage: int | None = typer.Option(None, help="MB of volumes in total"),
    config: str | None = ConfigOpt,
):
    """Create a user and print its API key (shown once)."""
    from ..core.users import new_key, new_user

    cfg, store = open_store(config)
    if store.user_by_name(name):
        raise fail(f"user {name!r} already exists")
    key = new_key()
    store.create_user(new_user(name, cfg, max_sandboxes, max_cpus, max_memory, max_volume_storage), key)
    typer.echo(f"created user {name}; API key (shown once):")
    typer.echo(key)


@user_app.command("list")
def user_list(config: str | None = ConfigOpt):
    """Users and their quotas."""
    _, store = open_store(config)
    for u in store.list_users():
        typer.echo(
            f"{u.id}\t{u.name}\tmax_sandboxes={u.max_sandboxes}\tmax_cpus={u.max_cpus_per_sandbox:g}"
            f"\tmax_memory_mb={u.max_memory_mb_per_sandbox}\tmax_volume_storage_mb={u.max_volume_storage_mb}"
            f"\tcreated {u.created_at}"
        )


def existing_user(store, name: str):
    user = store.user_by_name(name)
    if user is None:
        raise fail(f"no user {name!r}")
    return user


@user_app.command("delete")
def user_delete(name: str, config: str | None = ConfigOpt):
    """Delete a user that owns nothing any more."""
    _, store = open_store(config)
    user = existing_user(store, name)
    held = {k: n for k, n in store.user_holdings(user.id).items() if n}
    if held:
        raise fail(f"user {name!r} still has {', '.join(f'{n} {k}' for k, n in held.items())}; delete those first")
    store.delete_user(user.id)
    typer.echo(f"deleted user {name}")


@user_app.command("rotate-key")
def user_rotate_key(name: str, config: str | None = ConfigOpt):
    """Replace a user's API key (the old one stops working at once)."""
    from ..core.users import new_key, write_token

    cfg, store = open_store(config)
    user = existing_user(store, name)
    key = new_key()
    store.rotate_key(user.id, key)
    if user.name == "admin":
        write_token(cfg.data_dir / "admin.token", key)
    typer.echo(f"new API key for {name} (shown once; the old one no longer works):")
    typer.echo(key)


@app.command()
def setup(
    url: str = typer.Option(..., prompt="kiln URL", help="e.g. http://127.0.0.1:8080"),
    token: str = typer.Option(..., prompt="API key", hide_input=True),
):
    """Save the daemon URL and API key in ~/.kiln/config.yaml (checked against the daemon first)."""
    from ..client import Kiln, KilnError

    try:
        with Kiln(url, token) as k:
            k.sandboxes.list()
    except KilnError as e:
        raise fail(f"cannot use {url}: {e}")
    CLIENT_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(CLIENT_CONFIG, yaml.safe_dump({"url": url, "token": token}))
    typer.echo(f"saved to {CLIENT_CONFIG}")


@e2b_app.command("setup")
def e2b_setup(
    domain: str = typer.Option("e2b.localhost", "--domain", help="two labels at least; *.<domain> must reach kiln"),
    config: str | None = ConfigOpt,
):
    """(server host) Make a local CA and a *.<domain> certificate, turn on the E2B TLS listener (at the
    next start of the daemon), and print what E2B clients need."""
    from ..config import E2bConfig
    from ..e2b.tls import setup

    cfg = load_or_exit(config)
    try:
        domain = E2bConfig(domain=domain).domain
    except ValueError as e:
        raise fail(f"--domain: {e}", 2)
    files = setup(cfg.data_dir, domain)
    _host, _, port = cfg.e2b.tls_listen.rpartition(":")
    key_file = cfg.data_dir / "admin.token"
    key = key_file.read_text().strip() if key_file.exists() else ""
    shown = "e2b_" + key.removeprefix("kiln_") if key.startswith("kiln_") else "e2b_<the hex of a kiln key>"
    typer.echo(
        f"made {files.cert} for *.{domain} (CA: {files.ca}); restart the daemon to serve it on {cfg.e2b.tls_listen}"
    )
    typer.echo("E2B clients (domain mode):")
    typer.echo(f"  export E2B_DOMAIN={domain}:{port}")
    typer.echo(f"  export E2B_API_KEY={shown}")
    typer.echo(f"  export SSL_CERT_FILE={files.bundle}        # Python (the system's roots plus kiln's CA)")
    typer.echo(f"  export NODE_EXTRA_CA_CERTS={files.ca}   # Node")
    typer.echo(
        f"DNS: api.{domain} and <port>-<id>.{domain} must resolve to this host. The Python SDK (2.45 and later) "
        "resolves *.localhost to loopback itself; other clients need a wildcard record (or dnsmasq)."
    )
    typer.echo("URL mode (plain http, no DNS; Python 2.7+ and recent JS):")
    typer.echo(f"  export E2B_API_URL=http://{cfg.listen}/e2b E2B_SANDBOX_URL=http://{cfg.listen}/e2b/sandbox")
