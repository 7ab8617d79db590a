"""What the gVisor engine keeps about one sandbox, in `engine.json` in its directory: enough to find
its address, agent token, image and volumes again after a daemon restart."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..base import VolumeAttachment

RECORD_FILE = "engine.json"
RESOLVED_FILE = "resolved.json"  # {ip: unix time until which a deny-mode sandbox may reach it}


@dataclass
class Record:
    id: str
    slot: int  # its /30 in the sandbox subnet
    token: str  # the agent's token
    image: str
    memory_mb: int
    volumes: list[dict] = field(default_factory=list)  # VolumeAttachment fields
    net_policy: dict | None = None  # NetPolicy.to_json(); None: the daemon's default

    def volume_attachments(self) -> list[VolumeAttachment]:
        return [VolumeAttachment(**v) for v in self.volumes]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, sandbox_dir: Path) -> Record:
        """Raises OSError, ValueError or TypeError for a missing or damaged record."""
        return cls(**json.loads((sandbox_dir / RECORD_FILE).read_text()))
