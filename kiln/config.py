"""kiln's settings: config.yaml, every key optional, validated at start with errors naming the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config_paths import DEFAULT_DATA_DIR, DEFAULT_IMAGES_DIR, config_file


def host_port(v: str, example: str) -> str:
    _host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, e.g. {example}")
    return v


def dns_name(v: str, min_labels: int, message: str) -> str:
    """A DNS name of `min_labels` labels at least, lower-cased, without dots at its ends."""
    v = v.strip(".").lower()
    labels = v.split(".")
    if not v or len(labels) < min_labels or any(not p or len(p) > 63 for p in labels):
        raise ValueError(message)
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkConfig(Section):
    subnet: str = "10.77.0.0/16"
    uplink: str = Field("auto", description='egress interface; "auto": the default route\'s; "none": no egress')
    egress_default: Literal["public", "deny"] = "public"
    deny_cidrs: list[str] = Field([], description="never reachable from sandboxes, beside the private ranges")
    dns_upstream: list[str] = Field([], description="resolvers kiln's resolver asks (default: the host's)")

    @field_validator("deny_cidrs")
    @classmethod
    def _deny_cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        return [str(ipaddress.IPv4Network(c, strict=False)) for c in v]

    @field_validator("dns_upstream")
    @classmethod
    def _dns_upstream(cls, v: list[str]) -> list[str]:
        import ipaddress

        return [str(ipaddress.IPv4Address(a)) for a in v]

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        import ipaddress

        net = ipaddress.ip_network(v)  # raises ValueError with a clear message
        if net.version != 4 or net.prefixlen > 29:
            raise ValueError("must be an IPv4 network of /29 or larger")
        return str(net)


class ThermalConfig(Section):
    warm_after: float = Field(30.0, gt=0, description="seconds idle before a sandbox is paused")
    cold_after: float = Field(1800.0, gt=0, description="seconds warm before it is snapshotted to disk")
    tick: float = Field(10.0, gt=0)
    snapshot_on_shutdown: bool = Field(True, description="stop running sandboxes to disk when the daemon exits")


class RateConfig(Section):
    burst: int = Field(ge=1, description="requests allowed at once")
    per_minute: float = Field(gt=0, description="refill rate")


class PublishConfig(Section):
    domain: str = Field("localhost", description="published URLs are http://<alias>.<domain>:<listen port>/")
    max_concurrent_wakes: int = Field(10, ge=1, description="public requests waking sandboxes at once; more get 503")
    alias_quarantine: float = Field(
        3600.0, ge=0, description="seconds a released alias stays reserved for the user who released it"
    )
    rate_global: RateConfig = RateConfig(burst=10_000, per_minute=10_000)
    rate_per_ip: RateConfig = RateConfig(burst=500, per_minute=1_500)
    rate_per_alias: RateConfig = RateConfig(burst=2_000, per_minute=5_000)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return dns_name(v, 1, "must be a DNS name such as localhost or sandboxes.example.com")


class PortsConfig(Section):
    host_bind: str = Field("127.0.0.1", description="address the host_port relays listen on")
    scan_interval: float = Field(2.0, gt=0, description="seconds between port scans of a hot sandbox in use")
    scan_max_interval: float = Field(
        60.0,
        gt=0,
        description="seconds between port scans of a hot sandbox nobody uses: from scan_interval the interval "
        "doubles while nothing changes, and any use resets it",
    )


class LimitsConfig(Section):
    max_sandboxes: int = Field(50, ge=1)
    max_cpus_per_sandbox: float = Field(4, gt=0)
    max_memory_mb_per_sandbox: int = Field(4096, ge=16)
    exec_output_cap_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    default_disk_mb: int = Field(10240, ge=64, description="root disk cap of a sandbox that asks for none")
    max_disk_mb_per_sandbox: int = Field(51200, ge=64)
    max_volume_storage_mb: int = Field(20480, ge=1, description="volume storage per user")
    max_disk_mb_per_user: int = Field(
        256000, ge=64, description="sum of the root disk caps of one user's sandboxes (they are sparse: a cap, not use)"
    )
    max_ports_per_sandbox: int = Field(16, ge=1, le=1024, description="listening ports that get host relays")
    max_snapshots: int = Field(10, ge=0, description="named snapshots per user")
    max_images: int = Field(10, ge=0, description="images per user (imported, built or saved)")
    max_image_storage_mb: int = Field(51200, ge=1, description="what one user's images may take on disk")
    max_import_bytes: int = Field(10 << 30, ge=1 << 20, description="an image archive's size; more is 413")
    max_image_jobs: int = Field(2, ge=1, description="imports, builds and saves running at once on the server")
    build_timeout: float = Field(3600.0, gt=0, description="seconds one Dockerfile build may take")
    max_warm_pool: int = Field(5, ge=0, description="warm_pool of one template: sandboxes kept frozen, ready")
    warm_pools_count: bool = Field(False, description="whether warm-pool members count against sandbox quotas")
    # per user: POST /sandboxes; exec, file uploads and WebSockets; everything else
    rate_create: RateConfig = RateConfig(burst=10, per_minute=30)
    rate_exec: RateConfig = RateConfig(burst=30, per_minute=600)
    rate_read: RateConfig = RateConfig(burst=60, per_minute=1200)


class ServerConfig(Section):
    """Limits at the edge, before any route runs: what one client (or one anonymous visitor) can cost."""

    max_header_bytes: int = Field(64 * 1024, ge=4096, description="request line + headers; more is 431")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's headers")
    max_connections_per_ip: int = Field(256, ge=1, description="open connections from one client address")
    max_connections: int = Field(2048, ge=16, description="open connections and tasks in all; more get 503")
    max_json_body_bytes: int = Field(1 << 20, ge=1024, description="API request bodies, chunked or not; more is 413")
    body_idle_timeout: float = Field(30.0, gt=0, description="seconds an image or build upload may send nothing (408)")
    ws_max_message_bytes: int = Field(16 << 20, ge=1024, description="one WebSocket message either way; more is 1009")
    proxy_deadline: float = Field(3600.0, gt=0, description="seconds one authenticated proxy exchange may last")
    public_deadline: float = Field(300.0, gt=0, description="seconds one published-URL HTTP request may last")


class E2bConfig(Section):
    """The E2B-compatible surface: E2B's REST API and envd under /e2b on the main listener."""

    enabled: bool = Field(True, description="serve E2B's API under /e2b (the E2B SDKs' URL mode)")
    keep_hot: bool = Field(True, description="an E2B sandbox runs for its whole lease (no thermal pause)")
    max_lease: float = Field(86400.0, gt=0, description="the longest timeout an E2B sandbox may ask for, seconds")
    lease_tick: float = Field(1.0, gt=0, description="how often expired leases are looked for, seconds")
    max_upload_bytes: int = Field(2 << 30, ge=1 << 20, description="one envd file upload, after gunzip; more is 413")
    domain: str = Field(
        "",
        description="domain mode: api.<domain> and <port>-<id>.<domain> on the TLS listener ('': what `kiln e2b "
        "setup` recorded, if anything)",
    )
    tls_listen: str = Field("127.0.0.1:8443", description="HOST:PORT of the TLS listener of domain mode")
    public_ports: bool = Field(
        True,
        description="a sandbox's ports answer anyone at <port>-<id>.<domain>, as E2B's do; false: only with "
        "the sandbox's envd token (X-Access-Token or E2B-Traffic-Access-Token)",
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return dns_name(v, 2, "must be a DNS name of two labels at least, such as e2b.localhost") if v else v

    @field_validator("tls_listen")
    @classmethod
    def _tls_listen(cls, v: str) -> str:
        return host_port(v, "127.0.0.1:8443")


class Config(Section):
    listen: str = "127.0.0.1:8080"
    data_dir: Path = DEFAULT_DATA_DIR
    # the built-in images and the agent's runtime: machine-wide, shared by every daemon and checkout
    images_dir: Path = DEFAULT_IMAGES_DIR
    runsc: str = "runsc"
    log_level: str = "info"
    network: NetworkConfig = NetworkConfig()
    thermal: ThermalConfig = ThermalConfig()
    publish: PublishConfig = PublishConfig()
    ports: PortsConfig = PortsConfig()
    limits: LimitsConfig = LimitsConfig()
    server: ServerConfig = ServerConfig()
    e2b: E2bConfig = E2bConfig()

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return host_port(v, "127.0.0.1:8080")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0] or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def image_root(self) -> Path:
        return self.images_dir


class ConfigError(Exception):
    pass


def describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load from `path`, else $KILN_CONFIG, else /etc/kiln/config.yaml if present, else defaults."""
    chosen = config_file(path)
    data: Any = {}
    source = "(defaults)"
    if chosen is not None:
        source = str(chosen)
        try:
            data = yaml.safe_load(chosen.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {source}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {source} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {source} must be a mapping of keys to values")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, source)) from e
