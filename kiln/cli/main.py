"""The `kiln` command: `kiln serve` runs the daemon; `kiln image build` builds the default image."""
from __future__ import annotations

import argparse
import logging
import sys

from ..config import ConfigError, load_config


def serve(args) -> int:
    import uvicorn

    from ..app import build_app

    config = load_config(args.config)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level=config.log_level,
                access_log=False, timeout_graceful_shutdown=10,
                # proxied responses carry the app's own Date and Server; the API adds Date itself
                server_header=False, date_header=False,
                # the client address is the socket's: a forged X-Forwarded-For must not dodge rate limits
                proxy_headers=False)
    return 0


def image_build(args) -> int:
    from ..images.default import ensure_default_image

    config = load_config(args.config)
    ensure_default_image(config.image_root)
    return 0


def open_store(args):
    from ..store.db import Store

    config = load_config(args.config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return config, Store(config.data_dir / "state.db")


def user_create(args) -> int:
    from ..core.users import new_key, new_user

    config, store = open_store(args)
    if store.user_by_name(args.name):
        print(f"kiln: user {args.name!r} already exists", file=sys.stderr)
        return 1
    key = new_key()
    store.create_user(new_user(args.name, config, args.max_sandboxes, args.max_cpus, args.max_memory,
                               args.max_volume_storage), key)
    print(f"created user {args.name}; API key (shown once):")
    print(key)
    return 0


def user_list(args) -> int:
    _, store = open_store(args)
    for u in store.list_users():
        print(f"{u.id}\t{u.name}\tmax_sandboxes={u.max_sandboxes}\tmax_cpus={u.max_cpus_per_sandbox:g}"
              f"\tmax_memory_mb={u.max_memory_mb_per_sandbox}\tmax_volume_storage_mb={u.max_volume_storage_mb}"
              f"\tcreated {u.created_at}")
    return 0


def user_delete(args) -> int:
    _, store = open_store(args)
    user = store.user_by_name(args.name)
    if user is None:
        print(f"kiln: no user {args.name!r}", file=sys.stderr)
        return 1
    held = {k: n for k, n in store.user_holdings(user.id).items() if n}
    if held:
        what = ", ".join(f"{n} {k}" for k, n in held.items())
        print(f"kiln: user {args.name!r} still has {what}; delete those first", file=sys.stderr)
        return 1
    store.delete_user(user.id)
    print(f"deleted user {args.name}")
    return 0


def user_rotate_key(args) -> int:
    from ..core.users import new_key, write_token

    config, store = open_store(args)
    user = store.user_by_name(args.name)
    if user is None:
        print(f"kiln: no user {args.name!r}", file=sys.stderr)
        return 1
    key = new_key()
    store.rotate_key(user.id, key)
    if user.name == "admin":
        write_token(config.data_dir / "admin.token", key)
    print(f"new API key for {args.name} (shown once; the old one no longer works):")
    print(key)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln sandbox orchestrator")
    parser.add_argument("--config", help="config file (default: $KILN_CONFIG, then /etc/kiln/config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    p.set_defaults(func=serve)
    img = sub.add_parser("image", help="manage images").add_subparsers(dest="image_command", required=True)
    b = img.add_parser("build", help="build the default image if it is missing")
    b.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    b.set_defaults(func=image_build)
    users = sub.add_parser("user", help="manage API users (on the server host)").add_subparsers(
        dest="user_command", required=True)
    c = users.add_parser("create", help="create a user and print its API key once")
    c.add_argument("name")
    c.add_argument("--max-sandboxes", type=int, default=None)
    c.add_argument("--max-cpus", type=float, default=None, help="per sandbox")
    c.add_argument("--max-memory", type=int, default=None, help="MB per sandbox")
    c.add_argument("--max-volume-storage", type=int, default=None, help="MB of volumes in total")
    c.set_defaults(func=user_create)
    users.add_parser("list", help="list users and their quotas").set_defaults(func=user_list)
    d = users.add_parser("delete", help="delete a user that owns nothing any more")
    d.add_argument("name")
    d.set_defaults(func=user_delete)
    r = users.add_parser("rotate-key", help="replace a user's API key (printed once)")
    r.add_argument("name")
    r.set_defaults(func=user_rotate_key)
    for p in users.choices.values():
        p.add_argument("--config", dest="config", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
