"""The guest agent (stdlib only, mounted read-only into every sandbox), its wire protocol and the
host's client of it."""

from pathlib import Path

AGENT_DIR = Path(__file__).resolve().parent  # what the engine mounts into the guest
