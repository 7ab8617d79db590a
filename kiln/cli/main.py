"""Entry point of the `kiln` command (see server.py for the app and commands.py for the client side)."""

from . import commands
from .server import app

__all__ = ["app", "commands", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
