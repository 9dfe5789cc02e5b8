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
    "checked_url",
    "open_readonly_storage",
    "readonly_url_and_engine_kwargs",
    "unset_variables",
    "with_retries",
    "fail_stale_trials",
    "DatabaseUnreachable",
    "STORAGE_RETRY_SECONDS",
    "storage_retry_seconds",
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


def checked_url(url: str, *, must_exist: bool = False) -> str:
    """``url`` with its ``${VAR}`` expanded, once the checks that retrying cannot help have
    passed (said at once; retries are for locks and restarts): the URL's rules, and an SQLite
    path that can hold a database (``must_exist``: and does)."""
    from ._spec import check_storage_url

    check_storage_url(url, allow_password=True)  # the same rules for a URL typed on the command line
    expanded = _expand(url)
    if expanded.startswith("sqlite:"):
        path = expanded.split("sqlite:///", 1)[-1]
        if must_exist and not Path(path).exists():
            raise FileNotFoundError(f"no study database at {path}")
        problem = _sqlite_path_problem(Path(path))
        if problem:
            raise ValueError(f"storage {redact(url)}: {problem}")
    return expanded


def open_storage(url: str, *, must_exist: bool = False):
    """An Optuna RDBStorage for ``url`` with engine settings that survive restarts and locks."""
    expanded = checked_url(url, must_exist=must_exist)
    if expanded.startswith("sqlite:"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": 300}
    try:
        # a few seconds of retries at the start (a server just starting); the long budget of
        # with_retries is for a connection lost mid-study, through RetryingStorage
        rdb = with_retries(lambda: _create_rdb(expanded, engine_kwargs), attempts=4)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"cannot open storage {redact(url)}: {_short(error)}") from None
    return RetryingStorage(rdb)


def _create_rdb(url: str, engine_kwargs, tries: int = 5):
    """Optuna's RDBStorage for ``url``, creating its tables on a new database.  Another process
    creating them at the same moment (a second study's driver on the same new database) makes
    the creation fail on a duplicate table, type or version row: the tables are there then, and
    the next try opens them."""
    import optuna

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except Exception as error:  # noqa: BLE001
            text = " ".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None).lower()
            racing = any(s in text for s in ("alembic_version", "already exists", "unique constraint",
                                             "duplicate key", "duplicate entry"))
            if not racing or attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


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


#: How long a storage operation is retried while the database is unreachable (a restart, a
#: network cut, a locked SQLite file) before :class:`DatabaseUnreachable` is raised; the
#: environment variable ``GSMSEARCH_STORAGE_RETRY_SECONDS`` sets another bound.
STORAGE_RETRY_SECONDS = 300.0


class DatabaseUnreachable(RuntimeError):
    """The study database stayed unreachable for the whole retry bound.  ``storage`` (the URL,
    password hidden) and ``resume`` (the command that continues the study) are filled in by the
    driver, which knows them; the message then says both."""

    def __init__(self, detail: str, seconds: float, storage: str = "", resume: str = "") -> None:
        super().__init__(detail, seconds, storage, resume)
        self.detail, self.seconds, self.storage, self.resume = detail, float(seconds), storage, resume

    def __str__(self) -> str:
        where = f"the database at {self.storage}" if self.storage else "the study database"
        text = f"{where} is unreachable ({self.detail}; retried for {self.seconds:.0f}s)"
        if self.resume:
            text += (f"; every finished trial is safe in it; once it is back, continue the study with: "
                     f"{self.resume}")
        return text


def storage_retry_seconds() -> float:
    """The retry bound: ``GSMSEARCH_STORAGE_RETRY_SECONDS`` when set (seconds, > 0), else
    :data:`STORAGE_RETRY_SECONDS`."""
    value = os.environ.get("GSMSEARCH_STORAGE_RETRY_SECONDS", "").strip()
    if value:
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"GSMSEARCH_STORAGE_RETRY_SECONDS={value!r}: expected a number of seconds") from None
        if not seconds > 0 or seconds != seconds:
            raise ValueError(f"GSMSEARCH_STORAGE_RETRY_SECONDS={value!r}: expected a number of seconds > 0")
        return seconds
    return STORAGE_RETRY_SECONDS


def with_retries(action: Callable[[], T], *, attempts: Optional[int] = None, first_delay: float = 0.5,
                 seconds: Optional[float] = None) -> T:
    """Run ``action``, retrying transient database errors with exponential backoff (0.5 s
    doubling to 10 s): ``attempts`` tries when given, else for up to ``seconds`` (default
    :func:`storage_retry_seconds`), after which :class:`DatabaseUnreachable` is raised."""
    import optuna

    bound = None if attempts is not None else (seconds if seconds is not None else storage_retry_seconds())
    start = time.monotonic()
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except DatabaseUnreachable:
            raise  # an inner retry has waited out the bound already
        except Exception as error:  # noqa: BLE001
            cause = (error.__cause__ or error.__context__) if isinstance(
                error, optuna.exceptions.StorageInternalError) else error
            if not (_transient(error) or (cause and _transient(cause))):
                raise
            if attempts is not None and attempt >= attempts:
                raise
            if bound is not None and time.monotonic() - start + delay > bound:
                detail = _short(cause if isinstance(cause, Exception) else error)
                raise DatabaseUnreachable(detail, time.monotonic() - start) from error
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


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
