"""One driver per study: a lock row in the study's own database.

The table ``gsmsearch_driver_lock`` (``study_name`` primary key, ``host``, ``pid``, ``token``,
``acquired_at``, ``heartbeat_at``) sits beside Optuna's tables.  A driver takes its study's row in
one statement: an INSERT (the primary key lets only one of two racing drivers in), or, over a row
that is stale, an UPDATE conditioned on the token it read (compare-and-swap: of two drivers taking
over the same stale row, one updates it, the other finds the token changed and is refused).  The
row is stale when its heartbeat is older than ``stale_seconds`` (by the database's clock, so
hosts with different clocks agree), or when it names a process on this host that no longer
exists; ``--force`` takes any row.  The holder refreshes the heartbeat (:meth:`DriverLock.refresh`)
and deletes the row when it stops (:meth:`DriverLock.release`); a hard-killed driver's row is
taken over once stale.

The lock is taken before Optuna creates its tables, so two drivers started at once on a fresh
database never race on Optuna's schema.  Commands that only read (``status``, ``export``, the
dashboard) never touch it.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Dict, Optional

from ._spec import SpecError

__all__ = ["DriverLock", "DriverLockHeld", "DriverLockLost", "LOCK_TABLE"]

LOCK_TABLE = "gsmsearch_driver_lock"

_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} ("
    " study_name VARCHAR(512) NOT NULL PRIMARY KEY,"
    " host VARCHAR(255) NOT NULL,"
    " pid INTEGER NOT NULL,"
    " token VARCHAR(64) NOT NULL,"
    " acquired_at DOUBLE PRECISION NOT NULL,"
    " heartbeat_at DOUBLE PRECISION NOT NULL)"
)


class DriverLockHeld(SpecError):
    """Another driver holds the study (its host and process are in the message)."""


class DriverLockLost(RuntimeError):
    """This driver's lock was taken by another driver (``--force``, or after this one went
    unseen for longer than the stale time): it must stop writing."""


def _process_gone(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class DriverLock:
    """The lock of study ``study_name`` in the database at ``url`` (``${VAR}`` expanded)."""

    def __init__(self, url: str, study_name: str, *, stale_seconds: float = 60.0,
                 host: Optional[str] = None, pid: Optional[int] = None) -> None:
        self.url, self.study_name, self.stale_seconds = url, study_name, float(stale_seconds)
        self.host = host or socket.gethostname()
        self.pid = int(pid if pid is not None else os.getpid())
        self.token = uuid.uuid4().hex
        self.held = False
        self._engine = None

    # -- database --------------------------------------------------------------------------

    def engine(self):
        if self._engine is None:
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            from ._storage import checked_url

            expanded = checked_url(self.url)
            backend = sqlalchemy.engine.make_url(expanded).get_backend_name()
            connect_args: Dict[str, Any] = {"timeout": 60} if backend == "sqlite" else {}
            if backend == "postgresql":
                connect_args["connect_timeout"] = 10
            self._engine = sqlalchemy.create_engine(expanded, poolclass=NullPool, connect_args=connect_args)
        return self._engine

    def _now(self, conn) -> float:
        """The database's clock, in seconds since the epoch."""
        from sqlalchemy import text

        backend = conn.dialect.name
        if backend == "sqlite":
            query = "SELECT (julianday('now') - 2440587.5) * 86400.0"
        elif backend == "postgresql":
            query = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
        elif backend in ("mysql", "mariadb"):
            query = "SELECT UNIX_TIMESTAMP(NOW(6))"
        else:  # pragma: no cover - check_storage_url allows no other
            return time.time()
        return float(conn.execute(text(query)).scalar())

    def create_table(self) -> None:
        """Create the lock table if it is missing; two processes doing so at once both succeed.
        A database that does not answer is said at once ("cannot open storage"), as
        :func:`~._storage.open_storage` says it."""
        from sqlalchemy import inspect, text

        from ._storage import _short, redact, with_retries

        def create():
            try:
                with self.engine().begin() as conn:
                    conn.execute(text(_CREATE))
            except Exception:  # noqa: BLE001 - PostgreSQL: a concurrent CREATE ... IF NOT EXISTS can collide
                if LOCK_TABLE not in inspect(self.engine()).get_table_names():
                    raise

        try:
            with_retries(create, attempts=4)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"cannot open storage {redact(self.url)}: {_short(error)}") from None

    def _row(self, conn) -> Optional[Dict[str, Any]]:
        from sqlalchemy import text

        row = conn.execute(text(f"SELECT host, pid, token, heartbeat_at FROM {LOCK_TABLE} "
                                f"WHERE study_name = :name"), {"name": self.study_name}).mappings().first()
        return dict(row) if row is not None else None

    # -- the lock --------------------------------------------------------------------------

    def acquire(self, *, force: bool = False) -> None:
        """Take the study's lock, or raise :class:`DriverLockHeld` naming the driver that holds it."""
        from ._storage import with_retries

        self.create_table()
        for _ in range(20):  # each turn ends in a decision unless the row changed under us
            outcome = with_retries(lambda: self._try_acquire(force))
            if outcome is True:
                self.held = True
                return
            if isinstance(outcome, DriverLockHeld):
                raise outcome
        raise DriverLockHeld(f"study {self.study_name!r}: the driver lock kept changing hands; try again")

    def _try_acquire(self, force: bool):
        """True when taken; a :class:`DriverLockHeld` to raise; None to try again."""
        from sqlalchemy import text
        from sqlalchemy.exc import IntegrityError

        values = {"name": self.study_name, "host": self.host, "pid": self.pid, "token": self.token}
        try:
            with self.engine().begin() as conn:
                now = self._now(conn)
                conn.execute(text(f"INSERT INTO {LOCK_TABLE} (study_name, host, pid, token, acquired_at, "
                                  f"heartbeat_at) VALUES (:name, :host, :pid, :token, :now, :now)"),
                             {**values, "now": now})
            return True
        except IntegrityError:
            pass  # a row exists: stale, or held
        with self.engine().begin() as conn:
            row = self._row(conn)
            if row is None:
                return None  # released meanwhile
            now = self._now(conn)
            age = now - float(row["heartbeat_at"])
            gone = row["host"] == self.host and _process_gone(row["pid"])
            if not (force or age >= self.stale_seconds or gone):
                return DriverLockHeld(
                    f"another driver is running study {self.study_name!r} (pid {row['pid']} on {row['host']}, "
                    f"seen {max(age, 0):.0f}s ago; its lock is taken over once unseen for "
                    f"{self.stale_seconds:g}s); wait for it or pass --force")
            taken = conn.execute(
                text(f"UPDATE {LOCK_TABLE} SET host = :host, pid = :pid, token = :token, acquired_at = :now, "
                     f"heartbeat_at = :now WHERE study_name = :name AND token = :old"),
                {**values, "now": now, "old": row["token"]})
            return True if taken.rowcount == 1 else None

    def holder(self) -> Optional[Dict[str, Any]]:
        """The row as it is: host, pid, token and heartbeat time of the holder (None: free)."""
        with self.engine().connect() as conn:
            return self._row(conn)

    def refresh(self) -> None:
        """Record that this driver is alive; :class:`DriverLockLost` if another driver holds the
        lock now."""
        from sqlalchemy import text

        from ._storage import with_retries

        def beat():
            with self.engine().begin() as conn:
                now = self._now(conn)
                updated = conn.execute(
                    text(f"UPDATE {LOCK_TABLE} SET heartbeat_at = :now WHERE study_name = :name AND token = :token"),
                    {"now": now, "name": self.study_name, "token": self.token}).rowcount
                return updated, (self._row(conn) if updated != 1 else None)

        updated, row = with_retries(beat)
        if updated != 1:
            self.held = False
            by = f"pid {row['pid']} on {row['host']}" if row else "no driver"
            raise DriverLockLost(f"study {self.study_name!r}: this driver's lock is held by another driver "
                                 f"now ({by}); this driver stops without writing")

    def release(self) -> None:
        """Give the lock up (once; a database that is away keeps the row until it goes stale)."""
        from sqlalchemy import text

        if self.held:
            self.held = False
            try:
                with self.engine().begin() as conn:
                    conn.execute(text(f"DELETE FROM {LOCK_TABLE} WHERE study_name = :name AND token = :token"),
                                 {"name": self.study_name, "token": self.token})
            except Exception:  # noqa: BLE001 - the database may be what failed; the row goes stale
                pass
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
