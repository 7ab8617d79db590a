"""Publish rules: a sandbox port reachable without auth at http://<alias>.<publish.domain>[:port]/.

Aliases are global (one namespace across users). Rules never wake a sandbox; the public proxy's
requests do. Resolving an alias goes through a bounded in-memory cache in front of the store.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict

from ..config import Config
from ..store.db import NameTaken, PublishRule, SandboxRow, Store, User, now
from .errors import BadRequest, Conflict, KilnError, NotFound
from .names import ALIAS_RE

RESERVED = {"www", "mail", "admin", "status", "ns1", "ns2", "api", "app", "_acme-challenge"}
CACHE_SIZE = 10_000
AUTO_ALIAS_ATTEMPTS = 4


def validate_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias):
        raise BadRequest("alias must be lowercase alphanumeric with hyphens, 1-63 chars")
    if alias in RESERVED:
        raise BadRequest(f'alias "{alias}" is reserved')


def auto_alias(sandbox_name: str) -> str:
    """Sandbox name made DNS-safe, plus 6 random hex characters: `My_App` -> `my-app-1a2b3c`."""
    base = re.sub(r"[^a-z0-9-]", "-", sandbox_name.lower()).strip("-") or "sandbox"
    return f"{base[:56]}-{secrets.token_hex(3)}"


class PublishService:
    def __init__(self, store: Store, config: Config):
        self.store = store
        self.domain = config.publish.domain
        self.url_port = "" if config.port == 80 else f":{config.port}"
        self.cache: OrderedDict[str, PublishRule] = OrderedDict()
        self.quarantine = config.publish.alias_quarantine

    def url(self, alias: str) -> str:
        return f"http://{alias}.{self.domain}{self.url_port}"

    def alias_of_host(self, host: str) -> str | None:
        """The alias a request's Host header names, or None when it is not a published-URL host."""
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip().lower().rstrip(".")
        suffix = "." + self.domain
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
        return None

    def publish(self, user: User, row: SandboxRow, port: int, alias: str | None) -> tuple[PublishRule, bool]:
        """Returns (rule, existed): publishing a port that already is returns its rule."""
        if not 1 <= port <= 65535:
            raise BadRequest("port must be 1-65535")
        if alias is not None:
            validate_alias(alias)
            # a released alias is its user's for a while: another tenant taking it at once would
            # receive the visitors (and cookies) meant for the old one
            freed_by = self.store.alias_freed_by(alias, int(time.time() - self.quarantine))
            if freed_by is not None and freed_by != user.id:
                raise Conflict(f'alias "{alias}" was released recently; it can be claimed again later')
        for rule in self.store.publish_rules(row.id):
            if rule.port == port:
                return rule, True
        candidates = [alias] if alias is not None else [auto_alias(row.name) for _ in range(AUTO_ALIAS_ATTEMPTS)]
        for candidate in candidates:
            rule = PublishRule(
                id="pub_" + secrets.token_hex(8),
                sandbox_id=row.id,
                user_id=user.id,
                port=port,
                alias=candidate,
                created_at=now(),
            )
            try:
                self.store.insert_publish_rule(rule)
                return rule, False
            except NameTaken:
                for existing in self.store.publish_rules(row.id):
                    if existing.port == port:  # a concurrent request published it first
                        return existing, True
        if alias is not None:
            raise Conflict(f'alias "{alias}" is already taken')
        raise KilnError("alias generation failed")

    def rules(self, row: SandboxRow) -> list[PublishRule]:
        return self.store.publish_rules(row.id)

    def unpublish(self, row: SandboxRow, port: int) -> None:
        rule = self.store.delete_publish_rule(row.id, port)
        if rule is None:
            raise NotFound(f"no publish rule for port {port} on this sandbox")
        self.cache.pop(rule.alias, None)

    async def forget_sandbox(self, sandbox_id: str) -> None:
        """Drop cached rules of a destroyed sandbox (the store deletes them with the sandbox)."""
        for alias in [a for a, r in self.cache.items() if r.sandbox_id == sandbox_id]:
            del self.cache[alias]

    def resolve(self, alias: str) -> PublishRule | None:
        rule = self.cache.get(alias)
        if rule is not None:
            self.cache.move_to_end(alias)
            return rule
        if not ALIAS_RE.match(alias):
            return None
        rule = self.store.publish_rule_by_alias(alias)
        if rule is not None:
            self.cache[alias] = rule
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return rule
