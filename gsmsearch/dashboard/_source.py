"""Reading studies for the dashboard, read-only at the database level.

The dashboard never writes: it opens the storage through a SQLAlchemy engine whose connections
cannot write, so a bug cannot change a study either:

- SQLite: the file is opened as ``file:PATH?mode=ro`` (``uri=true``); any write raises
  "attempt to write a readonly database".  The file must exist (it is never created).
- PostgreSQL: every connection starts with ``default_transaction_read_only=on``.
- MySQL: every connection runs ``SET SESSION TRANSACTION READ ONLY``.

Optuna's table creation is skipped (``skip_table_creation=True``); the studies are then loaded
with ``optuna.load_study`` and only read (``get_trials``, ``user_attrs``).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..search._storage import readonly_url_and_engine_kwargs  # the one rule for every reader
from ..search._study import TrialRecord, objective_split, study_records, trial_constraints

__all__ = ["StudySource", "StudyView", "readonly_storage", "resolve_sources", "sources_in_storage",
           "load_view", "DataCache"]


@dataclass(frozen=True)
class StudySource:
    """Where one study lives: its name, its storage URL (``${VAR}`` unexpanded) and a label."""

    name: str
    url: str
    label: str


@dataclass
class StudyView:
    """A study as read at one moment: what every view is computed from."""

    key: str  # position in the dashboard ("0", "1", ...): used in element ids, never a name
    name: str
    label: str
    storage: str  # redacted URL
    metric_names: List[str] = field(default_factory=list)
    directions: List[str] = field(default_factory=list)
    spec: Dict[str, Any] = field(default_factory=dict)
    records: List[TrialRecord] = field(default_factory=list)
    # the split its quality values were measured on: "val", or "test" for a study an older
    # gsmsearch recorded (``gsmsearch.search.objective_split``); shown on every quality label
    objective_split: str = "test"
    error: Optional[str] = None  # why the study could not be read (shown instead of its views)


def readonly_storage(url: str):
    """An Optuna RDBStorage on connections that cannot write (see the module docstring)."""
    import optuna

    from ..search import redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    readonly, engine_kwargs = readonly_url_and_engine_kwargs(url)
    try:
        return optuna.storages.RDBStorage(readonly, engine_kwargs=engine_kwargs, skip_table_creation=True)
    except Exception as error:  # noqa: BLE001
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot open storage {redact(url)} read-only: {text}") from None


def resolve_sources(spec, base_dir: Path) -> List[StudySource]:
    """The studies a dashboard spec names, with storage URLs resolved against ``base_dir``."""
    from ..search import load_spec, resolve_storage_url, study_paths

    sources = []
    for ref in spec.studies:
        if ref.spec is not None:
            spec_path = Path(ref.spec)
            if not spec_path.is_absolute():
                spec_path = base_dir / spec_path
            study_spec = load_spec(spec_path)
            spec_dir = study_paths(study_spec, spec_path)["spec_dir"]
            url = resolve_storage_url(ref.storage or study_spec.storage, spec_dir=spec_dir,
                                      study_name=study_spec.name)
            name = study_spec.name
        else:
            name = ref.study
            url = resolve_storage_url(ref.storage or spec.storage, spec_dir=base_dir, study_name=name)
        sources.append(StudySource(name=name, url=url, label=ref.label or name))
    return sources


def sources_in_storage(url: str, names: Optional[List[str]] = None) -> List[StudySource]:
    """Every study in a storage (or the named ones), in creation order."""
    storage = readonly_storage(url)
    available = [s.study_name for s in storage.get_all_studies()]
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"no study {missing[0]!r} in that storage; it has: "
                             f"{', '.join(available) or '(none)'}")
        available = list(names)
    if not available:
        raise ValueError("that storage has no studies yet")
    return [StudySource(name=n, url=url, label=n) for n in available]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # a constraint that is not a number: not known to hold (infeasible)


def _records(study) -> List[TrialRecord]:
    """The study's trial records, with what the views rely on made safe whatever the study holds
    (it may come from plain Optuna or another tool): the family is a string or None; a constraint
    value that is not a number counts as violated."""
    try:
        records = study_records(study)
    except (TypeError, ValueError):
        records = []
        for trial in study.get_trials(deepcopy=False):
            constraints = trial_constraints(trial.system_attrs, _number)
            records.append(TrialRecord(
                number=trial.number, state=trial.state.name,
                family=trial.params.get("family") or trial.user_attrs.get("family"),
                values=list(trial.values) if trial.values is not None else None,
                params=dict(trial.params), user_attrs=dict(trial.user_attrs), constraints=constraints))
    for record in records:
        if record.family is not None and not isinstance(record.family, str):
            record.family = str(record.family)[:100]
        if not isinstance(record.user_attrs, dict):
            record.user_attrs = {}
    return records


def load_view(source: StudySource, key: str, storage=None) -> StudyView:
    """Read one study; a study that cannot be read gives a view with ``error`` set."""
    import optuna

    from ..search import redact

    view = StudyView(key=key, name=source.name, label=source.label, storage=redact(source.url))
    try:
        storage = storage or readonly_storage(source.url)
        study = optuna.load_study(study_name=source.name, storage=storage)
        view.directions = ["maximize" if d.name == "MAXIMIZE" else "minimize" for d in study.directions]
        view.metric_names = list(study.metric_names or [f"objective_{i}" for i in range(len(view.directions))])
        spec = study.user_attrs.get("spec")
        view.spec = spec if isinstance(spec, dict) else {}
        view.objective_split = objective_split(study.user_attrs)
        view.records = _records(study)
    except KeyError:
        view.error = f"no study {source.name!r} in {view.storage}"
    except Exception as error:  # noqa: BLE001 - one unreadable study must not stop the others
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        view.error = f"cannot read study {source.name!r} from {view.storage}: {text[:300]}"
    return view


class DataCache:
    """The latest views of a dashboard's studies, re-read at most every ``max_age`` seconds
    (one read-only storage per URL, shared by the server's threads)."""

    def __init__(self, sources: List[StudySource], max_age: float = 2.0, *,
                 discover: Optional[str] = None) -> None:
        """``discover``: a storage URL whose studies are listed again at every re-read (the
        dashboard of a whole storage: studies launched after it started appear; a database
        without Optuna's tables yet, as a fresh PostgreSQL, shows as "no studies yet")."""
        self.sources = list(sources)
        self.max_age = max_age
        self.discover = discover
        self.listing_error: Optional[str] = None  # why the last listing of ``discover`` failed
        self._storages: Dict[str, Any] = {}
        self._views: Optional[List[StudyView]] = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def _list_studies(self) -> None:
        try:
            names = [s.study_name for s in self._storage(self.discover).get_all_studies()]
        except Exception as error:  # noqa: BLE001 - shown on the page, tried again next time
            self.listing_error = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return
        self.listing_error = None
        known = {source.name for source in self.sources}
        self.sources += [StudySource(name=n, url=self.discover, label=n) for n in names if n not in known]

    def _storage(self, url: str):
        if url not in self._storages:
            self._storages[url] = readonly_storage(url)
        return self._storages[url]

    def views(self, refresh: bool = False) -> List[StudyView]:
        import time

        with self._lock:
            if refresh or self._views is None or time.monotonic() - self._read_at > self.max_age:
                if self.discover:
                    self._list_studies()
                views = []
                previous = {view.key: view for view in self._views or []}
                for index, source in enumerate(self.sources):
                    try:
                        storage = self._storage(source.url)
                    except Exception as error:  # noqa: BLE001
                        from ..search import redact

                        views.append(StudyView(key=str(index), name=source.name, label=source.label,
                                               storage=redact(source.url), error=str(error)))
                        continue
                    view = load_view(source, str(index), storage)
                    # an unchanged study keeps its view object, so what is computed from it
                    # (the dashboard's figures) can be reused instead of rebuilt at every refresh
                    old = previous.get(view.key)
                    views.append(old if old is not None and old == view else view)
                self._views, self._read_at = views, time.monotonic()
            return self._views
