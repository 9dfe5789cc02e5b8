"""Where a study lives: storage URLs, engines that survive restarts, stale-trial recovery.

- The default storage is an SQLite file beside the spec (``<spec dir>/<name>.db``).
- ``${VAR}`` in a URL is expanded from the environment when the storage is opened (never stored);
  PostgreSQL passwords can also come from PGPASSWORD or ~/.pgpass (libpq reads them).
- Engines use ``pool_pre_ping`` (PostgreSQL/MySQL: a connection lost to a server restart is
  replaced instead of failing a write) and a long SQLite busy timeout.
- Only the driver writes to the database (workers return results to it), so SQLite is safe.
- An SQLite storage is a regular file or a new path: a device, FIFO or socket is refused (SQLite
  would write a journal beside it).
- Commands that only read (`status`, `list`, `export`) open storages with
  :func:`open_readonly_storage`: connections that cannot write, and Optuna's tables are never
  created; a database without them is "no gsmsearch/Optuna study".
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

__all__ = [
    "resolve_storage_url",
    "redact",
    "open_storage",
    "open_readonly_storage",
    "readonly_url_and_engine_kwargs",
    "unset_variables",
    "with_retries",
    "fail_stale_trials",
]

T = TypeVar("T")


def resolve_storage_url(url: Optional[str], *, spec_dir: Path, study_name: str) -> str:
    """The storage URL as written (``${VAR}`` unexpanded); default: SQLite beside the spec."""
    if url is None:
        return f"sqlite:///{(Path(spec_dir) / f'{study_name}.db').resolve()}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        # relative SQLite paths are relative to the spec, not to the working directory
        relative = url[len("sqlite:///"):]
        if relative.startswith("${") and os.path.isabs(os.path.expandvars(relative)):
            return url  # sqlite:///${DIR}/x.db with an absolute DIR: already absolute once expanded
        if "${" in relative:  # keep the variables for open_storage to expand (and to name if unset)
            return f"sqlite:///{Path(spec_dir).resolve()}/{relative}"
        return f"sqlite:///{(Path(spec_dir) / relative).resolve()}"
    return url


def redact(url: str) -> str:
    """The URL for messages and logs: password hidden, ${VAR} left as written (not URL-encoded),
    cut to 300 characters."""
    import re

    from sqlalchemy.engine import make_url

    try:
        text = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never let a message fail
        return "<unparseable storage URL>"
    text = re.sub(r"%24%7B([A-Za-z_][A-Za-z0-9_]*)%7D", r"${\1}", text, flags=re.IGNORECASE)
    return text if len(text) <= 300 else text[:300] + "..."


def unset_variables(url: str) -> list:
    """The ``${VAR}`` names in ``url`` that the environment does not set."""
    return [name for name in _env_names(url) if name not in os.environ]


def _expand(url: str) -> str:
    missing = unset_variables(url)
    if missing:
        raise ValueError(f"storage URL {redact(url)} uses ${{{missing[0]}}}, which is not set")
    return os.path.expandvars(url)


def _sqlite_path_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot hold an SQLite database (None when it can): an existing path that is
    not a regular file (links followed), or a folder that does not exist."""
    import stat

    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            return f"the folder {path.parent} does not exist"
        return None
    except OSError as error:  # a link loop, a name too long, ...
        return f"{path}: {error.strerror or error}"
    if stat.S_ISDIR(info.st_mode):
        return f"{path} is a folder, not a database file"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (a device, FIFO or socket cannot hold a database)"
    return None


def _env_names(url: str):
    import re

    return re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", url)


def open_storage(url: str, *, must_exist: bool = False):
    """An Optuna RDBStorage for ``url`` with engine settings that survive restarts and locks."""
    import optuna

    from ._spec import check_storage_url

    check_storage_url(url, allow_password=True)  # the same rules for a URL typed on the command line
    expanded = _expand(url)
    if expanded.startswith("sqlite:"):
        path = expanded.split("sqlite:///", 1)[-1]
        if must_exist and not Path(path).exists():
            raise FileNotFoundError(f"no study database at {path}")
        # said at once: retrying cannot help these (retries are for locks and restarts)
        problem = _sqlite_path_problem(Path(path))
        if problem:
            raise ValueError(f"storage {redact(url)}: {problem}")
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 300}
    try:
        # a few seconds of retries at the start (a server just starting); the long budget of
        # with_retries is for a connection lost mid-study, through RetryingStorage
        rdb = with_retries(lambda: optuna.storages.RDBStorage(expanded, engine_kwargs=engine_kwargs), attempts=4)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot open storage {redact(url)}: {_short(error)}") from None
    return RetryingStorage(rdb)


#: Tables every Optuna storage has (gsmsearch studies are Optuna studies).
OPTUNA_TABLES = ("studies", "trials", "version_info", "alembic_version")


def readonly_url_and_engine_kwargs(url: str):
    """(URL, SQLAlchemy engine kwargs) whose connections cannot write: SQLite ``mode=ro`` on an
    existing regular file (never created), PostgreSQL ``default_transaction_read_only``, MySQL
    ``READ ONLY`` sessions.  ``${VAR}`` in ``url`` must be set."""
    from sqlalchemy.engine import URL, make_url

    from ._spec import check_storage_url

    check_storage_url(url, allow_password=True)
    parsed = make_url(_expand(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = Path(parsed.database or "").expanduser().absolute()
        if not os.path.lexists(path):
            raise FileNotFoundError(f"no study database at {path}")
        problem = _sqlite_path_problem(path)
        if problem:
            raise ValueError(f"storage {redact(url)}: {problem}")
        from urllib.parse import quote

        readonly = URL.create("sqlite", database="file:" + quote(str(path.resolve())),
                              query={"mode": "ro", "uri": "true"}).render_as_string(hide_password=False)
        return readonly, {"connect_args": {"timeout": 60}}
    if backend == "postgresql":
        return parsed.render_as_string(hide_password=False), {
            "pool_pre_ping": True, "connect_args": {"options": "-c default_transaction_read_only=on"}}
    # mysql (check_storage_url allows no other)
    return parsed.render_as_string(hide_password=False), {
        "pool_pre_ping": True, "connect_args": {"init_command": "SET SESSION TRANSACTION READ ONLY"}}


def open_readonly_storage(url: str):
    """An Optuna storage for ``url`` that reads and never writes: its connections refuse writes
    (:func:`readonly_url_and_engine_kwargs`), a missing SQLite file is not created, and Optuna's
    tables are not created: a database without them raises "no gsmsearch/Optuna study in URL"."""
    import optuna
    import sqlalchemy

    readonly, engine_kwargs = readonly_url_and_engine_kwargs(url)

    def tables():
        engine = sqlalchemy.create_engine(readonly, **engine_kwargs)
        try:
            return set(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()

    try:
        present = with_retries(tables, attempts=4)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot open storage {redact(url)}: {_short(error)}") from None
    if not set(OPTUNA_TABLES) <= present:
        raise ValueError(f"no gsmsearch/Optuna study in {redact(url)} (it has no Optuna tables)")
    try:
        rdb = with_retries(lambda: optuna.storages.RDBStorage(readonly, engine_kwargs=engine_kwargs,
                                                              skip_table_creation=True), attempts=4)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot open storage {redact(url)} read-only: {_short(error)}") from None
    return RetryingStorage(rdb)


def _retrying_storage_class():
    """A BaseStorage that forwards every call to Optuna's cached RDB storage, retrying transient
    database errors (a restarted server, a locked SQLite file) with backoff.  Every read and write
    of the driver goes through it, so a database restart mid-study costs a pause, not the study."""
    import optuna
    from optuna.storages import BaseStorage

    try:
        from optuna.storages._cached_storage import _CachedStorage
    except ImportError:  # pragma: no cover - a future Optuna without it: no cache, same results
        _CachedStorage = None

    def forward(name):
        def method(self, *args, **kwargs):
            return with_retries(lambda: getattr(self._inner, name)(*args, **kwargs))

        method.__name__ = name
        return method

    names = [n for n in dir(BaseStorage) if not n.startswith("_")]
    namespace = {name: forward(name) for name in names}

    def __init__(self, rdb):
        self._rdb = rdb
        self._inner = _CachedStorage(rdb) if _CachedStorage is not None else rdb

    def __getattr__(self, name):  # anything else (engine, url, ...) from the RDB storage
        return getattr(self._rdb, name)

    namespace.update(__init__=__init__, __getattr__=__getattr__)
    return type("RetryingStorage", (BaseStorage,), namespace)


class _LazyClass:
    def __init__(self, factory):
        self._factory, self._cls = factory, None

    def __call__(self, *args, **kwargs):
        if self._cls is None:
            self._cls = self._factory()
        return self._cls(*args, **kwargs)


RetryingStorage = _LazyClass(_retrying_storage_class)


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _transient(error: Exception) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError

    text = str(error).lower()
    if isinstance(error, OperationalError):
        return True
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return any(s in text for s in ("database is locked", "server closed the connection",
                                   "connection refused", "could not connect", "terminating connection"))


def with_retries(action: Callable[[], T], *, attempts: int = 8, first_delay: float = 0.5) -> T:
    """Run ``action``, retrying transient database errors with exponential backoff (~1 min)."""
    import optuna

    delay = first_delay
    for attempt in range(attempts):
        try:
            return action()
        except Exception as error:  # noqa: BLE001
            cause = (error.__cause__ or error.__context__) if isinstance(
                error, optuna.exceptions.StorageInternalError) else error
            if attempt == attempts - 1 or not (_transient(error) or (cause and _transient(cause))):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")  # pragma: no cover


def fail_stale_trials(study, *, reason: str) -> list:
    """Mark every RUNNING trial of ``study`` FAIL (their driver is gone).  Returns their params.

    Only call this when no other driver runs the study (launch holds the study lock)."""
    import optuna
    from optuna.trial import TrialState

    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", reason)
        study._storage.set_trial_user_attr(trial._trial_id, "final", False)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        stale.append(trial)
    return stale
