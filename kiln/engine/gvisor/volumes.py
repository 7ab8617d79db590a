"""Volumes as the gVisor engine attaches them: each volume image is loop-mounted once on the host
(at `<data_dir>/volume-mounts/<image name>`) while any of the engine's sandboxes uses it, and
bind-mounted into each such sandbox; the last sandbox to go unmounts it."""

from __future__ import annotations

from pathlib import Path

from ... import diskimage
from ...proc import CommandFailed
from ..base import EngineError, VolumeAttachment


class VolumeMounts:
    def __init__(self, root: Path):
        self.root = root

    def mountpoint(self, image: str) -> Path:
        return self.root / Path(image).stem  # volume image names are unique ids

    async def ensure(self, volumes: list[VolumeAttachment]) -> None:
        for v in volumes:
            try:
                await diskimage.mount(Path(v.image), self.mountpoint(v.image))
            except CommandFailed as e:
                raise EngineError(f"mount volume {Path(v.image).name}: {e}") from e

    async def release_unused(self, in_use: set[str]) -> None:
        """Unmount every volume whose image no sandbox in `in_use` (image paths) attaches."""
        wanted = {self.mountpoint(i) for i in in_use}
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if d not in wanted:
                await diskimage.unmount(d, remove_dir=True)

    def leftovers(self) -> list[str]:
        return [str(d) for d in self.root.iterdir()] if self.root.is_dir() else []
