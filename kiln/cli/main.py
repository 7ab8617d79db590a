"""Entry point of the `kiln` command. The hot verbs run on the standard library (fast.py); everything
else loads the Typer app (server.py for the app and the server-host commands, commands.py for the
client side)."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # before any other import: scripts ask this to probe for kiln
        from .. import __version__

        print(f"kiln {__version__}")
        return
    from . import fast

    code = fast.main(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from . import commands  # noqa: F401 (registers the client commands on the app)
    from .server import app

    app()


if __name__ == "__main__":
    main()
