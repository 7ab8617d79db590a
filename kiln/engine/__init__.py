"""Engines: what runs sandboxes. `base` is the contract; `make_engine` picks the configured one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Engine


def make_engine(config: Config) -> Engine:
    """The engine a daemon with this config runs (today always gVisor). Building one touches nothing
    on the host until start_engine, so tests may build one to inspect or scrub a daemon's objects."""
    from .gvisor.engine import GVisorEngine
    from .gvisor.network import EgressSettings

    net = config.network
    egress = EgressSettings(net.uplink, tuple(net.deny_cidrs), tuple(net.dns_upstream), net.egress_default)
    return GVisorEngine(config.data_dir, config.image_root, net.subnet, config.runsc, egress)
