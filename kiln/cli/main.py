"""Entry point of the `kiln` command (see server.py for the app and commands.py for the client side)."""
from . import commands  # noqa: F401  (the client commands register themselves on the app)
from .server import app

__all__ = ["app", "commands", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
