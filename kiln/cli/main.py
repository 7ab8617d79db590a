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
                access_log=False, timeout_graceful_shutdown=10)
    return 0


def image_build(args) -> int:
    from ..images.default import ensure_default_image

    config = load_config(args.config)
    ensure_default_image(config.image_root)
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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
