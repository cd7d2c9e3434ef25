"""The node's control-plane state in SQLite: API tokens, the audit log, long
operations and the history of each group's failover states.

One module owns the database; everything else calls these methods. WAL
mode (readers never wait for the writer), ``synchronous=FULL`` (a committed
audit entry survives a power cut), foreign keys on. The schema is versioned
in code: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``,
each in one transaction, and ``PRAGMA user_version`` says where a database
is. The SQL is plain (no SQLite-only syntax besides the pragmas and the
triggers, which PostgreSQL spells as rules), so a PostgreSQL store is the
same statements through another connection.

The audit log is append-only: triggers refuse UPDATE and DELETE on it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SCOPES = ("read", "operate", "admin")  # each includes the ones before it
DB_NAME = "havend.db"

MIGRATIONS: list[str] = [
    # 1: tokens, audit log, operations, group state history
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scope TEXT NOT NULL CHECK (scope IN ('read', 'operate', 'admin')),
        hash TEXT NOT NULL,
        created REAL NOT NULL,
        revoked REAL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        request TEXT NOT NULL,
        status INTEGER NOT NULL,
        result TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TABLE operations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        actor TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
        created REAL NOT NULL,
        updated REAL NOT NULL,
        request TEXT NOT NULL,
        result TEXT,
        error TEXT
    );
    CREATE TABLE group_states (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL,
        time REAL NOT NULL,
        state TEXT NOT NULL,
        generation TEXT,
        reason TEXT NOT NULL
    );
    CREATE INDEX group_states_by_group ON group_states (grp, id);
    """,
    # 2: groups created through the API (those of the config file are not here)
    """
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
    # 3: node settings made through the API (the paired target, paused groups)
    """
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 4: drills' results posted to the target node: the proof that a
    # checkpoint of a group recovered the application
    """
    CREATE TABLE verifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL,
        checkpoint TEXT NOT NULL,
        checkpoint_seq INTEGER NOT NULL,
        checkpoint_time REAL NOT NULL,
        passed INTEGER NOT NULL,
        plan TEXT NOT NULL,
        rto_seconds REAL,
        report TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX verifications_by_group ON verifications (grp, created);
    """,
]


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    name: str
    scope: str

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


def _hash(secret: str) -> str:
    # Tokens are 256 random bits: a plain SHA-256 cannot be brute-forced.
    return hashlib.sha256(secret.encode()).hexdigest()


class StateStore:
    """The node's SQLite database (``<state_dir>/havend.db``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        new = not os.path.exists(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if new:
            os.chmod(path, 0o600)  # token hashes and the audit trail
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()  # one connection, shared by threads
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self.migrate()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema to the newest version, one migration per transaction."""
        current = self.version
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.path} has schema version {current}, newer than this havend "
                f"({len(MIGRATIONS)}): upgrade havend"
            )
        for version in range(current, len(MIGRATIONS)):
            with self._tx() as db:
                for statement in _statements(MIGRATIONS[version]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")

    # Tokens -----------------------------------------------------------------

    def create_token(self, name: str, scope: str) -> tuple[Token, str]:
        """A new token; (its record, the secret to hand over: shown once)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        token_id = secrets.token_hex(6)
        secret = f"hvn_{token_id}_{secrets.token_urlsafe(32)}"
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (id, name, scope, hash, created) VALUES (?, ?, ?, ?, ?)",
                (token_id, name, scope, _hash(secret), time.time()),
            )
        return Token(token_id, name, scope), secret

    def check_token(self, secret: str) -> Token | None:
        """The token this secret is, unless unknown or revoked."""
        parts = secret.split("_")
        if len(parts) < 3 or parts[0] != "hvn":
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, scope, hash, revoked FROM tokens WHERE id = ?", (parts[1],)
            ).fetchone()
        if row is None or row["revoked"] is not None:
            return None
        if not hmac.compare_digest(row["hash"], _hash(secret)):
            return None
        return Token(row["id"], row["name"], row["scope"])

    def tokens(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, scope, created, revoked FROM tokens ORDER BY created"
            ).fetchall()
        return [dict(r) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time(), token_id),
            )
            return cur.rowcount == 1

    # Audit ------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, target: str, request: Any, status: int, result: Any
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO audit (time, actor, action, target, request, status, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    actor,
                    action,
                    target,
                    json.dumps(request, default=str),
                    status,
                    json.dumps(result, default=str),
                ),
            )
            return int(cur.lastrowid or 0)

    def audit_entries(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        out = []
        for r in rows:
            entry = dict(r)
            entry["request"] = json.loads(entry["request"])
            entry["result"] = json.loads(entry["result"])
            out.append(entry)
        return out

    # Operations -------------------------------------------------------------

    def start_operation(self, kind: str, target: str, actor: str, request: Any) -> str:
        op_id = uuid.uuid4().hex
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO operations (id, kind, target, actor, state, created, updated, "
                "request) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                (op_id, kind, target, actor, now, now, json.dumps(request, default=str)),
            )
        return op_id

    def finish_operation(self, op_id: str, result: Any = None, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE operations SET state = ?, updated = ?, result = ?, error = ? WHERE id = ?",
                (
                    "failed" if error is not None else "succeeded",
                    time.time(),
                    json.dumps(result, default=str) if result is not None else None,
                    error,
                    op_id,
                ),
            )

    def operation(self, op_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM operations WHERE id = ?", (op_id,)).fetchone()
        if row is None:
            return None
        op = dict(row)
        op["request"] = json.loads(op["request"])
        op["result"] = json.loads(op["result"]) if op["result"] else None
        return op

    def abandon_running(self) -> int:
        """At start: operations of a previous process that never finished."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE operations SET state = 'failed', updated = ?, error = ? "
                "WHERE state = 'running'",
                (time.time(), "havend stopped while it ran: check the group's state"),
            )
            return cur.rowcount

    # Groups created through the API ------------------------------------------------

    def save_group(self, name: str, config: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO groups (name, config, created) VALUES (?, ?, ?)",
                (name, json.dumps(config), time.time()),
            )

    def delete_group(self, name: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM groups WHERE name = ?", (name,)).rowcount == 1

    def update_group(self, name: str, config: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE groups SET config = ? WHERE name = ?", (json.dumps(config), name))

    # Drills' verifications (target node) ------------------------------------------

    def add_verification(
        self,
        group: str,
        checkpoint: dict[str, Any],
        passed: bool,
        plan: str,
        rto_seconds: float | None,
        report: dict[str, Any],
    ) -> dict[str, Any]:
        """Record a drill's result for a retained checkpoint of ``group``."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO verifications (grp, checkpoint, checkpoint_seq, checkpoint_time, "
                "passed, plan, rto_seconds, report, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    group,
                    checkpoint["id"],
                    int(checkpoint["seq"]),
                    float(checkpoint["time"]),
                    1 if passed else 0,
                    plan,
                    rto_seconds,
                    json.dumps(report),
                    time.time(),
                ),
            )
            row = db.execute(
                "SELECT * FROM verifications WHERE id = ?", (cur.lastrowid,)
            ).fetchone()
        return _verification(row)

    def verifications(self, group: str, limit: int = 100) -> list[dict[str, Any]]:
        """A group's verifications, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM verifications WHERE grp = ? ORDER BY id DESC LIMIT ?",
                (group, limit),
            ).fetchall()
        return [_verification(r) for r in rows]

    def last_verified(self, group: str) -> dict[str, Any] | None:
        """The newest checkpoint (by its own time) a drill recovered from."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM verifications WHERE grp = ? AND passed = 1 "
                "ORDER BY checkpoint_time DESC, id DESC LIMIT 1",
                (group,),
            ).fetchone()
        return _verification(row) if row else None

    def setting(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else None

    def set_setting(self, key: str, value: Any) -> None:
        """Set (None: remove) a node setting."""
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO settings (key, value, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                    "updated = excluded.updated",
                    (key, json.dumps(value), time.time()),
                )

    def groups(self) -> list[dict[str, Any]]:
        """The API's groups, oldest first (as they were created)."""
        with self._lock:
            rows = self._db.execute("SELECT config FROM groups ORDER BY created").fetchall()
        return [json.loads(r["config"]) for r in rows]

    # Group states -------------------------------------------------------------

    def record_state(self, group: str, state: str, generation: str | None, reason: str) -> None:
        """A group's state changed (only a change is recorded)."""
        with self._tx() as db:
            last = db.execute(
                "SELECT state, generation FROM group_states WHERE grp = ? ORDER BY id DESC LIMIT 1",
                (group,),
            ).fetchone()
            if last is not None and (last["state"], last["generation"]) == (state, generation):
                return
            db.execute(
                "INSERT INTO group_states (grp, time, state, generation, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                (group, time.time(), state, generation, reason),
            )

    def state_history(self, group: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT time, state, generation, reason FROM group_states WHERE grp = ? "
                "ORDER BY id DESC LIMIT ?",
                (group, limit),
            ).fetchall()
        return [dict(r) for r in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(state_dir: str) -> StateStore:
    """The node's state database, ``<state_dir>/havend.db`` (made and migrated
    on first use)."""
    os.makedirs(state_dir, exist_ok=True)
    return StateStore(os.path.join(state_dir, DB_NAME))


def _statements(script: str) -> list[str]:
    """The statements of a migration (triggers hold ``;`` inside BEGIN...END)."""
    out: list[str] = []
    current = ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete statement in a migration: {current!r}")
    return out


def _verification(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "group": row["grp"],
        "checkpoint": {
            "id": row["checkpoint"],
            "seq": row["checkpoint_seq"],
            "time": row["checkpoint_time"],
        },
        "passed": bool(row["passed"]),
        "plan": row["plan"],
        "rto_seconds": row["rto_seconds"],
        "report": json.loads(row["report"]),
        "time": row["created"],
    }
