"""What an image says about the processes it runs: the OCI image config's fields kiln honours."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)  # under the sandbox's own env
    workdir: str = ""  # the default cwd of exec (and shells)
    user: str = ""  # the default user of exec, shells and the start command
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    exposed_ports: list[int] = field(default_factory=list)  # recorded, not published
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def start(self) -> list[str]:
        """The image's start command: Entrypoint then Cmd, as Docker joins them."""
        return [*self.entrypoint, *self.cmd]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> ImageConfig:
        d = d or {}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def from_oci(cls, image_config: dict) -> ImageConfig:
        """From an OCI/Docker image config blob (its `config` object holds these fields)."""
        c = image_config.get("config") or {}
        env: dict[str, str] = {}
        for item in c.get("Env") or []:
            key, sep, value = str(item).partition("=")
            if sep and key:
                env[key] = value
        ports = []
        for p in c.get("ExposedPorts") or {}:
            number = str(p).split("/")[0]
            if number.isdigit():
                ports.append(int(number))
        return cls(
            env=env,
            workdir=str(c.get("WorkingDir") or ""),
            user=str(c.get("User") or ""),
            entrypoint=[str(a) for a in c.get("Entrypoint") or []],
            cmd=[str(a) for a in c.get("Cmd") or []],
            exposed_ports=sorted(set(ports)),
            labels={str(k): str(v) for k, v in (c.get("Labels") or {}).items()},
        )
