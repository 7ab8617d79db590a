"""The store: SQLite in WAL mode, the only module that speaks SQL.

Schema changes are numbered migrations applied in order at open; `PRAGMA user_version` records
how far a database has come. Every query that reads user-owned rows takes the owner.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..states import IN_FLIGHT, IllegalTransition, Reason, Status, check_transition

MIGRATIONS: list[str] = [
    # 1: users, API keys, sandboxes
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        max_sandboxes INTEGER NOT NULL,
        max_cpus_per_sandbox REAL NOT NULL,
        max_memory_mb_per_sandbox INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        ip TEXT NOT NULL DEFAULT '',
        cpus REAL NOT NULL,
        memory_mb INTEGER NOT NULL,
        image TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        init TEXT NOT NULL DEFAULT '',
        keep_hot INTEGER NOT NULL DEFAULT 0,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        stopped_at TEXT
    );
    CREATE UNIQUE INDEX sandboxes_owner_name ON sandboxes(owner_id, name);
    """,
    # 2: the last snapshot's summary {kind, bytes_written, bytes_total, taken_at}
    """
    ALTER TABLE sandboxes ADD COLUMN snapshot TEXT;
    """,
    # 3: listening ports from the last scan (with their host relay ports) and publish rules
    """
    CREATE TABLE sandbox_ports (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        container_port INTEGER NOT NULL,
        host_port INTEGER NOT NULL,
        PRIMARY KEY (sandbox_id, container_port)
    );
    CREATE TABLE publish_rules (
        id TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL REFERENCES users(id),
        port INTEGER NOT NULL,
        alias TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        UNIQUE (sandbox_id, port)
    );
    """,
    # 4: templates, secrets (values sealed), volumes and their attachments, volume quota, the sealed
    #    secret environment a sandbox was created with
    """
    ALTER TABLE users ADD COLUMN max_volume_storage_mb INTEGER NOT NULL DEFAULT 20480;
    ALTER TABLE sandboxes ADD COLUMN template_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE sandboxes ADD COLUMN sealed_env BLOB;
    CREATE TABLE templates (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (owner_id, name)
    );
    CREATE TABLE secrets (
        owner_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        sealed BLOB NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (owner_id, name)
    );
    CREATE TABLE volumes (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        size_mb INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (owner_id, name)
    );
    CREATE TABLE volume_attachments (
        volume_id TEXT NOT NULL REFERENCES volumes(id),
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        mount TEXT NOT NULL,
        read_only INTEGER NOT NULL,
        PRIMARY KEY (volume_id, sandbox_id)
    );
    """,
    # 5: the cap on a sandbox's root disk (0: made before the cap existed)
    """
    ALTER TABLE sandboxes ADD COLUMN disk_mb INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: one spelling for every reason (snake_case)
    """
    UPDATE sandboxes SET reason='snapshot_failed' WHERE reason='snapshot failed';
    """,
    # 7: aliases released by unpublish or destroy, so another user cannot claim one at once
    """
    CREATE TABLE freed_aliases (
        alias TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        freed_at INTEGER NOT NULL
    );
    CREATE TRIGGER publish_rule_freed AFTER DELETE ON publish_rules BEGIN
        INSERT OR REPLACE INTO freed_aliases VALUES (old.alias, old.user_id, CAST(strftime('%s', 'now') AS INTEGER));
    END;
    """,
    # 8: the root disk size a create asked for (0: none, the default cap applies), beside the cap itself
    """
    ALTER TABLE sandboxes ADD COLUMN disk_asked_mb INTEGER NOT NULL DEFAULT 0;
    """,
    # 9: host ports forwarded into sandboxes on request (bhatti's forward), reopened after a restart
    """
    CREATE TABLE forwards (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        host_port INTEGER NOT NULL PRIMARY KEY,
        guest_port INTEGER NOT NULL
    );
    """,
    # 10: web shell share tokens (their SHA-256 only), one per sandbox
    """
    CREATE TABLE shell_tokens (
        sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes(id) ON DELETE CASCADE,
        token_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    """,
    # 11: the sandbox's egress policy (JSON; NULL: made before policies, the daemon's default applies)
    """
    ALTER TABLE sandboxes ADD COLUMN net_policy TEXT;
    """,
    # 12: named snapshots (memory and disk kept by the engine; what a resume needs to make a sandbox)
    """
    CREATE TABLE named_snapshots (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        source_sandbox TEXT NOT NULL,
        size_mb INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        spec TEXT NOT NULL,
        sealed_env BLOB,
        UNIQUE (owner_id, name)
    );
    """,
    # 13: users' images (imported, built, saved from a sandbox); built-in ones are not stored
    """
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL REFERENCES users(id),
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        source TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        config TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (owner_id, name)
    );
    """,
    # 14: warm-pool members: a sandbox kept frozen for a template ('' = a user's sandbox, listed)
    """
    ALTER TABLE sandboxes ADD COLUMN pool TEXT NOT NULL DEFAULT '';
    """,
    # 15: sandboxes made through the E2B API: the template asked for, free-form metadata, the lease
    """
    CREATE TABLE e2b_sandboxes (
        sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes(id) ON DELETE CASCADE,
        template TEXT NOT NULL,
        metadata TEXT NOT NULL,
        end_at REAL NOT NULL,
        on_timeout TEXT NOT NULL,
        auto_resume INTEGER NOT NULL,
        token_hash TEXT NOT NULL UNIQUE
    );
    """,
]


def statements(script: str):
    """The SQL statements of a migration script (a trigger's body keeps its own semicolons)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def now() -> str:
    """RFC 3339 UTC with nanosecond-style precision, like bhatti's Go timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class User:
    id: str
    name: str
    max_sandboxes: int
    max_cpus_per_sandbox: float
    max_memory_mb_per_sandbox: int
    created_at: str
    max_volume_storage_mb: int = 20480


@dataclass
class SandboxRow:
    id: str
    owner_id: str
    name: str
    status: Status
    cpus: float
    memory_mb: int
    image: str
    created_at: str
    reason: Reason = Reason.NONE
    ip: str = ""
    env: dict = field(default_factory=dict)
    init: str = ""
    keep_hot: bool = False
    labels: dict = field(default_factory=dict)
    stopped_at: str | None = None
    snapshot: dict | None = None
    template_id: str = ""
    sealed_env: bytes | None = None  # secrets given at create, encrypted; never in API output
    disk_mb: int = 0  # the cap on its root disk
    disk_asked_mb: int = 0  # what the create asked for (0: nothing, the default cap)
    net_policy: dict | None = None  # NetPolicy.to_json()
    pool: str = ""  # a warm-pool member of this template: never listed, never a user's to reach


@dataclass
class NamedSnapshot:
    id: str
    owner_id: str
    name: str
    source_sandbox: str
    size_mb: int
    created_at: str
    spec: dict  # cpus, memory_mb, image, env, init, disk_mb, disk_asked_mb, net_policy, template_id
    sealed_env: bytes | None = None  # the source's secrets, sealed to this snapshot


@dataclass
class ImageRow:
    id: str
    owner_id: str
    name: str
    status: str  # "creating" (its tree is being made; the name is taken) or "ready"
    source: str  # import, build or save
    size_bytes: int
    config: dict  # env, workdir, user, cmd, entrypoint, exposed_ports, labels (kiln/images/config.py)
    created_at: str


@dataclass
class Template:
    id: str
    owner_id: str
    name: str
    spec: dict
    created_at: str


@dataclass
class SecretRow:
    owner_id: str
    name: str
    sealed: bytes
    created_at: str
    updated_at: str


@dataclass
class Volume:
    id: str
    owner_id: str
    name: str
    size_mb: int
    created_at: str


@dataclass
class Attachment:
    volume_id: str
    sandbox_id: str
    mount: str
    read_only: bool


@dataclass
class PublishRule:
    id: str
    sandbox_id: str
    user_id: str
    port: int
    alias: str
    created_at: str


@dataclass
class E2bRecord:
    """What the E2B API keeps of one of its sandboxes beside the sandbox's own row."""

    sandbox_id: str
    template: str
    metadata: dict[str, str]
    end_at: float  # unix time the lease ends
    on_timeout: str  # "kill" | "pause"
    auto_resume: bool  # whether traffic to it while paused resumes it
    token_hash: str  # sha256 of the envd access token


class NameTaken(Exception):
    pass


class Store:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.migrate()

    def migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction() as db:
                for stmt in statements(script):
                    db.execute(stmt)
                db.execute(f"PRAGMA user_version={i}")

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN ... COMMIT under the store's lock; any exception rolls back and propagates."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.db.close()

    def _exec(self, sql: str, args=()) -> sqlite3.Cursor:
        with self.lock:
            return self.db.execute(sql, args)

    # ------------------------------------------------------------ users and keys

    def create_user(self, user: User, key: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO users (id, name, max_sandboxes, max_cpus_per_sandbox, max_memory_mb_per_sandbox,"
                " created_at, max_volume_storage_mb) VALUES (?,?,?,?,?,?,?)",
                (
                    user.id,
                    user.name,
                    user.max_sandboxes,
                    user.max_cpus_per_sandbox,
                    user.max_memory_mb_per_sandbox,
                    user.created_at,
                    user.max_volume_storage_mb,
                ),
            )
            db.execute("INSERT INTO api_keys VALUES (?,?,?)", (hash_key(key), user.id, now()))

    def user_by_name(self, name: str) -> User | None:
        row = self._exec("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        return User(**dict(row)) if row else None

    def user_by_id(self, user_id: str) -> User | None:
        row = self._exec("SELECT * FROM users WHERE id=?", (user_id,)).fetchone()
        return User(**dict(row)) if row else None

    def user_by_key(self, key: str) -> User | None:
        row = self._exec(
            "SELECT u.* FROM users u JOIN api_keys k ON k.user_id=u.id WHERE k.key_hash=?", (hash_key(key),)
        ).fetchone()
        return User(**dict(row)) if row else None

    def list_users(self) -> list[User]:
        return [User(**dict(r)) for r in self._exec("SELECT * FROM users ORDER BY created_at")]

    def rotate_key(self, user_id: str, key: str) -> None:
        """Replace every key of a user with one new key (the old ones stop working at once)."""
        with self.transaction() as db:
            db.execute("DELETE FROM api_keys WHERE user_id=?", (user_id,))
            db.execute("INSERT INTO api_keys VALUES (?,?,?)", (hash_key(key), user_id, now()))

    def user_holdings(self, user_id: str) -> dict[str, int]:
        """What a user still owns (a user is deleted only when this is all zeros)."""
        return {
            t: self._exec(f"SELECT COUNT(*) FROM {t} WHERE owner_id=?", (user_id,)).fetchone()[0]
            for t in ("sandboxes", "secrets", "volumes", "templates", "named_snapshots", "images")
        }

    def delete_user(self, user_id: str) -> None:
        self._exec("DELETE FROM users WHERE id=?", (user_id,))

    # ------------------------------------------------------------ sandboxes

    @staticmethod
    def _sandbox(row: sqlite3.Row) -> SandboxRow:
        d = dict(row)
        d["env"] = json.loads(d["env"])
        d["labels"] = json.loads(d["labels"])
        d["keep_hot"] = bool(d["keep_hot"])
        d["snapshot"] = json.loads(d["snapshot"]) if d["snapshot"] else None
        d["net_policy"] = json.loads(d["net_policy"]) if d["net_policy"] else None
        d["status"], d["reason"] = Status(d["status"]), Reason(d["reason"])
        return SandboxRow(**d)

    def insert_sandbox(self, s: SandboxRow) -> None:
        try:
            self._exec(
                "INSERT INTO sandboxes (id, owner_id, name, status, reason, ip, cpus, memory_mb, image, env, init,"
                " keep_hot, labels, created_at, stopped_at, template_id, sealed_env, disk_mb, disk_asked_mb,"
                " net_policy, pool) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    s.id,
                    s.owner_id,
                    s.name,
                    s.status,
                    s.reason,
                    s.ip,
                    s.cpus,
                    s.memory_mb,
                    s.image,
                    json.dumps(s.env),
                    s.init,
                    int(s.keep_hot),
                    json.dumps(s.labels),
                    s.created_at,
                    s.stopped_at,
                    s.template_id,
                    s.sealed_env,
                    s.disk_mb,
                    s.disk_asked_mb,
                    json.dumps(s.net_policy) if s.net_policy is not None else None,
                    s.pool,
                ),
            )
        except sqlite3.IntegrityError as e:
            raise NameTaken(s.name) from e

    def pool_members(self, template_id: str | None = None) -> list[SandboxRow]:
        if template_id is None:
            rows = self._exec("SELECT * FROM sandboxes WHERE pool!='' ORDER BY created_at")
        else:
            rows = self._exec("SELECT * FROM sandboxes WHERE pool=? ORDER BY created_at", (template_id,))
        return [self._sandbox(r) for r in rows]

    def claim_pool_member(
        self, sandbox_id: str, name: str, labels: dict, keep_hot: bool, sealed_env: bytes | None, net_policy: dict
    ) -> None:
        """A warm-pool member becomes its user's sandbox (listed from now on, under its new name)."""
        try:
            self._exec(
                "UPDATE sandboxes SET pool='', name=?, labels=?, keep_hot=?, sealed_env=?, net_policy=?, created_at=?"
                " WHERE id=? AND pool!=''",
                (name, json.dumps(labels), int(keep_hot), sealed_env, json.dumps(net_policy), now(), sandbox_id),
            )
        except sqlite3.IntegrityError as e:
            raise NameTaken(name) from e

    # Status changes: one intent method per move of the state machine (kiln/states.py), each checked
    # against its table inside one transaction.

    def _transition(self, sandbox_id: str, to: Status, reason: Reason, **fields) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT status FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is None:
                return  # destroyed meanwhile: nothing to record
            check_transition(row["status"], to)
            fields = {"status": str(to), "reason": str(reason), **fields}
            cols = ", ".join(f"{k}=?" for k in fields)
            db.execute(f"UPDATE sandboxes SET {cols} WHERE id=?", (*fields.values(), sandbox_id))

    def mark_running(self, sandbox_id: str, ip: str) -> None:
        self._transition(sandbox_id, Status.RUNNING, Reason.NONE, ip=ip)

    def mark_stopped(self, sandbox_id: str, reason: Reason, snapshot: dict | None = None) -> None:
        """Stopped to disk (reason NONE, with the snapshot's summary) or died (a death reason)."""
        fields: dict = {"stopped_at": now()}
        if snapshot is not None:
            fields["snapshot"] = json.dumps(snapshot)
        self._transition(sandbox_id, Status.STOPPED, reason, **fields)

    def mark_restore_failed(self, sandbox_id: str) -> None:
        self._transition(sandbox_id, Status.STOPPED, Reason.RESTORE_FAILED)

    def mark_unknown(self, sandbox_id: str, reason: Reason) -> None:
        self._transition(sandbox_id, Status.UNKNOWN, reason)

    def mark_destroying(self, sandbox_id: str) -> None:
        self._transition(sandbox_id, Status.DESTROYING, Reason.NONE)

    # Changes that are not status moves.

    def set_sandbox_net_policy(self, sandbox_id: str, policy: dict) -> None:
        self._exec("UPDATE sandboxes SET net_policy=? WHERE id=?", (json.dumps(policy), sandbox_id))

    def rename_sandbox(self, sandbox_id: str, name: str) -> None:
        try:
            self._exec("UPDATE sandboxes SET name=? WHERE id=?", (name, sandbox_id))
        except sqlite3.IntegrityError as e:
            raise NameTaken(name) from e

    def set_sandbox_labels(self, sandbox_id: str, labels: dict[str, str]) -> None:
        self._exec("UPDATE sandboxes SET labels=? WHERE id=?", (json.dumps(labels), sandbox_id))

    def set_keep_hot(self, sandbox_id: str, keep_hot: bool) -> None:
        self._exec("UPDATE sandboxes SET keep_hot=? WHERE id=?", (int(keep_hot), sandbox_id))

    def sandbox_by_id(self, sandbox_id: str) -> SandboxRow | None:
        row = self._exec("SELECT * FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
        return self._sandbox(row) if row else None

    def delete_sandbox(self, sandbox_id: str) -> None:
        """Only rows being created (a failed create) or destroyed leave the store."""
        with self.transaction() as db:
            row = db.execute("SELECT status FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is not None and row["status"] not in IN_FLIGHT:  # only half-made or half-gone rows
                raise IllegalTransition(f"a {row['status']} sandbox is never deleted: mark it destroying first")
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    def get_sandbox(self, owner_id: str, id_or_name: str) -> SandboxRow | None:
        """Exact id first, then name; only the owner's sandboxes."""
        row = self._exec("SELECT * FROM sandboxes WHERE owner_id=? AND id=?", (owner_id, id_or_name)).fetchone()
        if row is None:
            row = self._exec("SELECT * FROM sandboxes WHERE owner_id=? AND name=?", (owner_id, id_or_name)).fetchone()
        return self._sandbox(row) if row else None

    def list_sandboxes(self, owner_id: str | None = None) -> list[SandboxRow]:
        if owner_id is None:
            rows = self._exec("SELECT * FROM sandboxes ORDER BY created_at DESC")
        else:
            rows = self._exec("SELECT * FROM sandboxes WHERE owner_id=? ORDER BY created_at DESC", (owner_id,))
        return [self._sandbox(r) for r in rows]

    def running_sandbox_ids(self) -> list[str]:
        """Ids of users' running sandboxes: what a background loop needs to pick the few it acts on."""
        rows = self._exec("SELECT id FROM sandboxes WHERE status=? AND pool=''", (Status.RUNNING,))
        return [r[0] for r in rows]

    def running_sandboxes(self) -> list[SandboxRow]:
        """Users' running sandboxes (hot or warm), without reading the rest of the table."""
        rows = self._exec(
            "SELECT * FROM sandboxes WHERE status=? AND pool='' ORDER BY created_at DESC", (Status.RUNNING,)
        )
        return [self._sandbox(r) for r in rows]

    def count_sandboxes(self, owner_id: str | None = None, with_pools: bool = True) -> int:
        pools = "" if with_pools else " AND pool=''"
        if owner_id is None:
            return self._exec(f"SELECT COUNT(*) FROM sandboxes WHERE 1{pools}").fetchone()[0]
        return self._exec(f"SELECT COUNT(*) FROM sandboxes WHERE owner_id=?{pools}", (owner_id,)).fetchone()[0]

    # ------------------------------------------------------------ ports (last scan) and publish rules

    def sandbox_ports(self, sandbox_id: str | None = None) -> dict[str, dict[int, int]]:
        """{sandbox_id: {container_port: host_port}} of the last scan."""
        sql, args = "SELECT * FROM sandbox_ports", ()  # type: tuple[str, tuple[str, ...]]
        if sandbox_id is not None:
            sql, args = sql + " WHERE sandbox_id=?", (sandbox_id,)
        found: dict[str, dict[int, int]] = {}
        for r in self._exec(sql + " ORDER BY container_port", args):
            found.setdefault(r["sandbox_id"], {})[r["container_port"]] = r["host_port"]
        return found

    def set_sandbox_ports(self, sandbox_id: str, ports: dict[int, int]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM sandbox_ports WHERE sandbox_id=?", (sandbox_id,))
            db.executemany("INSERT INTO sandbox_ports VALUES (?,?,?)", [(sandbox_id, p, h) for p, h in ports.items()])

    # ------------------------------------------------------------ named snapshots

    def insert_named_snapshot(self, s: NamedSnapshot) -> None:
        try:
            self._exec(
                "INSERT INTO named_snapshots VALUES (?,?,?,?,?,?,?,?)",
                (s.id, s.owner_id, s.name, s.source_sandbox, s.size_mb, s.created_at, json.dumps(s.spec), s.sealed_env),
            )
        except sqlite3.IntegrityError as e:
            raise NameTaken(s.name) from e

    def named_snapshots(self, owner_id: str) -> list[NamedSnapshot]:
        rows = self._exec("SELECT * FROM named_snapshots WHERE owner_id=? ORDER BY created_at DESC", (owner_id,))
        return [self._named_snapshot(r) for r in rows]

    def named_snapshot_ids(self) -> set[str]:
        return {r[0] for r in self._exec("SELECT id FROM named_snapshots")}

    def named_snapshot(self, owner_id: str, name: str) -> NamedSnapshot | None:
        r = self._exec("SELECT * FROM named_snapshots WHERE owner_id=? AND name=?", (owner_id, name)).fetchone()
        return self._named_snapshot(r) if r else None

    def delete_named_snapshot(self, snapshot_id: str) -> None:
        self._exec("DELETE FROM named_snapshots WHERE id=?", (snapshot_id,))

    @staticmethod
    def _named_snapshot(r: sqlite3.Row) -> NamedSnapshot:
        d = dict(r)
        d["spec"] = json.loads(d["spec"])
        return NamedSnapshot(**d)

    # ------------------------------------------------------------ images

    def insert_image(self, i: ImageRow) -> None:
        try:
            self._exec(
                "INSERT INTO images VALUES (?,?,?,?,?,?,?,?)",
                (i.id, i.owner_id, i.name, i.status, i.source, i.size_bytes, json.dumps(i.config), i.created_at),
            )
        except sqlite3.IntegrityError as e:
            raise NameTaken(i.name) from e

    def finish_image(self, image_id: str, size_bytes: int, config: dict) -> None:
        self._exec(
            "UPDATE images SET status='ready', size_bytes=?, config=? WHERE id=?",
            (size_bytes, json.dumps(config), image_id),
        )

    def images(self, owner_id: str | None = None) -> list[ImageRow]:
        if owner_id is None:
            rows = self._exec("SELECT * FROM images ORDER BY created_at")
        else:
            rows = self._exec("SELECT * FROM images WHERE owner_id=? ORDER BY created_at", (owner_id,))
        return [self._image(r) for r in rows]

    def image(self, owner_id: str, name: str) -> ImageRow | None:
        r = self._exec("SELECT * FROM images WHERE owner_id=? AND name=?", (owner_id, name)).fetchone()
        return self._image(r) if r else None

    def delete_image(self, image_id: str) -> None:
        self._exec("DELETE FROM images WHERE id=?", (image_id,))

    def image_users(self, owner_id: str, name: str) -> dict[str, int]:
        """How many of the owner's sandboxes, templates and named snapshots use the image."""
        queries = {
            "sandboxes": "SELECT COUNT(*) FROM sandboxes WHERE owner_id=? AND image=?",
            "templates": "SELECT COUNT(*) FROM templates WHERE owner_id=? AND json_extract(spec, '$.image')=?",
            "snapshots": "SELECT COUNT(*) FROM named_snapshots WHERE owner_id=? AND json_extract(spec, '$.image')=?",
        }
        return {k: self._exec(q, (owner_id, name)).fetchone()[0] for k, q in queries.items()}

    @staticmethod
    def _image(r: sqlite3.Row) -> ImageRow:
        d = dict(r)
        d["config"] = json.loads(d["config"])
        return ImageRow(**d)

    # ------------------------------------------------------------ web shell tokens and forwards

    def set_shell_token(self, sandbox_id: str, token: str) -> None:
        self._exec("INSERT OR REPLACE INTO shell_tokens VALUES (?,?,?)", (sandbox_id, hash_key(token), now()))

    def shell_token_matches(self, sandbox_id: str, token: str) -> bool:
        row = self._exec("SELECT token_hash FROM shell_tokens WHERE sandbox_id=?", (sandbox_id,)).fetchone()
        return row is not None and hmac.compare_digest(row["token_hash"], hash_key(token))

    def delete_shell_token(self, sandbox_id: str) -> bool:
        return self._exec("DELETE FROM shell_tokens WHERE sandbox_id=?", (sandbox_id,)).rowcount > 0

    def forwards(self) -> list[tuple[str, int, int]]:
        """[(sandbox_id, host_port, guest_port)] of every forward."""
        rows = self._exec("SELECT * FROM forwards ORDER BY sandbox_id, host_port")
        return [(r["sandbox_id"], r["host_port"], r["guest_port"]) for r in rows]

    def insert_forward(self, sandbox_id: str, host_port: int, guest_port: int) -> None:
        self._exec("INSERT OR REPLACE INTO forwards VALUES (?,?,?)", (sandbox_id, host_port, guest_port))

    def delete_forward(self, host_port: int) -> None:
        self._exec("DELETE FROM forwards WHERE host_port=?", (host_port,))

    def delete_forwards(self, sandbox_id: str) -> None:
        self._exec("DELETE FROM forwards WHERE sandbox_id=?", (sandbox_id,))

    def insert_publish_rule(self, rule: PublishRule) -> None:
        """Raises NameTaken if the alias, or this sandbox's port, is already published."""
        try:
            self._exec(
                "INSERT INTO publish_rules VALUES (?,?,?,?,?,?)",
                (rule.id, rule.sandbox_id, rule.user_id, rule.port, rule.alias, rule.created_at),
            )
        except sqlite3.IntegrityError as e:
            raise NameTaken(rule.alias) from e

    def publish_rules(self, sandbox_id: str) -> list[PublishRule]:
        rows = self._exec("SELECT * FROM publish_rules WHERE sandbox_id=? ORDER BY port", (sandbox_id,))
        return [PublishRule(**dict(r)) for r in rows]

    def publish_rule_by_alias(self, alias: str) -> PublishRule | None:
        row = self._exec("SELECT * FROM publish_rules WHERE alias=?", (alias,)).fetchone()
        return PublishRule(**dict(row)) if row else None

    def delete_publish_rule(self, sandbox_id: str, port: int) -> PublishRule | None:
        row = self._exec(
            "DELETE FROM publish_rules WHERE sandbox_id=? AND port=? RETURNING *", (sandbox_id, port)
        ).fetchone()
        return PublishRule(**dict(row)) if row else None

    # ------------------------------------------------------------ templates

    @staticmethod
    def _template(row: sqlite3.Row) -> Template:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        return Template(**d)

    def insert_template(self, t: Template) -> None:
        try:
            self._exec(
                "INSERT INTO templates VALUES (?,?,?,?,?)", (t.id, t.owner_id, t.name, json.dumps(t.spec), t.created_at)
            )
        except sqlite3.IntegrityError as e:
            raise NameTaken(t.name) from e

    def get_template(self, owner_id: str, id_or_name: str) -> Template | None:
        row = self._exec(
            "SELECT * FROM templates WHERE owner_id=? AND (id=? OR name=?) ORDER BY id=? DESC",
            (owner_id, id_or_name, id_or_name, id_or_name),
        ).fetchone()
        return self._template(row) if row else None

    def list_templates(self, owner_id: str | None = None) -> list[Template]:
        if owner_id is None:
            rows = self._exec("SELECT * FROM templates ORDER BY created_at DESC")
        else:
            rows = self._exec("SELECT * FROM templates WHERE owner_id=? ORDER BY created_at DESC", (owner_id,))
        return [self._template(r) for r in rows]

    def delete_template(self, template_id: str) -> None:
        self._exec("DELETE FROM templates WHERE id=?", (template_id,))

    # ------------------------------------------------------------ secrets

    def upsert_secret(self, owner_id: str, name: str, sealed: bytes) -> SecretRow:
        ts = now()
        self._exec(
            "INSERT INTO secrets VALUES (?,?,?,?,?) ON CONFLICT (owner_id, name) DO UPDATE"
            " SET sealed=excluded.sealed, updated_at=excluded.updated_at",
            (owner_id, name, sealed, ts, ts),
        )
        row = self.get_secret(owner_id, name)
        assert row is not None
        return row

    def get_secret(self, owner_id: str, name: str) -> SecretRow | None:
        row = self._exec("SELECT * FROM secrets WHERE owner_id=? AND name=?", (owner_id, name)).fetchone()
        return SecretRow(**dict(row)) if row else None

    def list_secrets(self, owner_id: str) -> list[SecretRow]:
        return [
            SecretRow(**dict(r))
            for r in self._exec("SELECT * FROM secrets WHERE owner_id=? ORDER BY name", (owner_id,))
        ]

    def delete_secret(self, owner_id: str, name: str) -> bool:
        return self._exec("DELETE FROM secrets WHERE owner_id=? AND name=?", (owner_id, name)).rowcount > 0

    # ------------------------------------------------------------ volumes

    def insert_volume(self, v: Volume) -> None:
        try:
            self._exec("INSERT INTO volumes VALUES (?,?,?,?,?)", (v.id, v.owner_id, v.name, v.size_mb, v.created_at))
        except sqlite3.IntegrityError as e:
            raise NameTaken(v.name) from e

    def get_volume(self, owner_id: str, name: str) -> Volume | None:
        row = self._exec("SELECT * FROM volumes WHERE owner_id=? AND name=?", (owner_id, name)).fetchone()
        return Volume(**dict(row)) if row else None

    def volume_by_id(self, volume_id: str) -> Volume | None:
        row = self._exec("SELECT * FROM volumes WHERE id=?", (volume_id,)).fetchone()
        return Volume(**dict(row)) if row else None

    def list_volumes(self, owner_id: str) -> list[Volume]:
        return [
            Volume(**dict(r))
            for r in self._exec("SELECT * FROM volumes WHERE owner_id=? ORDER BY created_at DESC", (owner_id,))
        ]

    def alias_freed_by(self, alias: str, since_unix: int) -> str | None:
        """The user who released `alias` at or after `since_unix`, if anyone did."""
        row = self._exec(
            "SELECT user_id FROM freed_aliases WHERE alias=? AND freed_at>=?", (alias, since_unix)
        ).fetchone()
        return row["user_id"] if row else None

    def disk_mb_reserved(self, owner_id: str, with_pools: bool = True) -> int:
        """The sum of the root disk caps of a user's sandboxes."""
        pools = "" if with_pools else " AND pool=''"
        sql = f"SELECT COALESCE(SUM(disk_mb), 0) FROM sandboxes WHERE owner_id=?{pools}"
        return self._exec(sql, (owner_id,)).fetchone()[0]

    def volume_storage_mb(self, owner_id: str) -> int:
        return self._exec("SELECT COALESCE(SUM(size_mb), 0) FROM volumes WHERE owner_id=?", (owner_id,)).fetchone()[0]

    def set_volume_size(self, volume_id: str, size_mb: int) -> None:
        self._exec("UPDATE volumes SET size_mb=? WHERE id=?", (size_mb, volume_id))

    def delete_volume(self, volume_id: str) -> None:
        self._exec("DELETE FROM volumes WHERE id=?", (volume_id,))

    def attach_volume(self, a: Attachment) -> None:
        self._exec(
            "INSERT INTO volume_attachments VALUES (?,?,?,?)", (a.volume_id, a.sandbox_id, a.mount, int(a.read_only))
        )

    def attachments(self, volume_id: str | None = None, sandbox_id: str | None = None) -> list[Attachment]:
        sql, args = "SELECT * FROM volume_attachments WHERE 1=1", []  # type: str, list[str]
        if volume_id is not None:
            sql, args = sql + " AND volume_id=?", [*args, volume_id]
        if sandbox_id is not None:
            sql, args = sql + " AND sandbox_id=?", [*args, sandbox_id]
        return [
            Attachment(r["volume_id"], r["sandbox_id"], r["mount"], bool(r["read_only"])) for r in self._exec(sql, args)
        ]

    # ------------------------------------------------------------ E2B sandboxes

    @staticmethod
    def _e2b(r: sqlite3.Row) -> E2bRecord:
        d = dict(r)
        d["metadata"] = json.loads(d["metadata"])
        d["auto_resume"] = bool(d["auto_resume"])
        return E2bRecord(**d)

    def insert_e2b(self, r: E2bRecord) -> None:
        self._exec(
            "INSERT INTO e2b_sandboxes (sandbox_id, template, metadata, end_at, on_timeout, auto_resume, token_hash)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                r.sandbox_id,
                r.template,
                json.dumps(r.metadata),
                r.end_at,
                r.on_timeout,
                int(r.auto_resume),
                r.token_hash,
            ),
        )

    def e2b_record(self, sandbox_id: str) -> E2bRecord | None:
        row = self._exec("SELECT * FROM e2b_sandboxes WHERE sandbox_id=?", (sandbox_id,)).fetchone()
        return self._e2b(row) if row else None

    def e2b_by_token_hash(self, token_hash: str) -> E2bRecord | None:
        row = self._exec("SELECT * FROM e2b_sandboxes WHERE token_hash=?", (token_hash,)).fetchone()
        return self._e2b(row) if row else None

    def e2b_records(self, owner_id: str) -> list[E2bRecord]:
        rows = self._exec(
            "SELECT e.* FROM e2b_sandboxes e JOIN sandboxes s ON s.id = e.sandbox_id WHERE s.owner_id=?"
            " ORDER BY s.created_at, s.id",
            (owner_id,),
        )
        return [self._e2b(r) for r in rows]

    def expired_e2b(self, now_unix: float) -> list[E2bRecord]:
        rows = self._exec("SELECT * FROM e2b_sandboxes WHERE end_at <= ?", (now_unix,))
        return [self._e2b(r) for r in rows]

    def set_e2b_lease(self, sandbox_id: str, end_at: float) -> None:
        self._exec("UPDATE e2b_sandboxes SET end_at=? WHERE sandbox_id=?", (end_at, sandbox_id))
