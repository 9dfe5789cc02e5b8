"""Reading studies for the dashboard, read-only at the database level.

The dashboard never writes: it opens the storage through a SQLAlchemy engine whose connections
cannot write, so a bug cannot change a study either:

- SQLite: the file is opened as ``file:PATH?mode=ro`` (``uri=true``); any write raises
  "attempt to write a readonly database".  The file must exist (it is never created).
- PostgreSQL: every connection starts with ``default_transaction_read_only=on``.
- MySQL: every connection runs ``SET SESSION TRANSACTION READ ONLY``.

The trials are read with :class:`gsmsearch.search._records.StudyReader`: a few set-based queries
of Optuna's tables, holding the user attributes the views use for every trial
(:data:`~gsmsearch.search._records.VIEW_KEYS`); the rest of a trial's attributes (its recorded
``layers``) are read for the trials whose detail is shown (:meth:`StudyView.detailed`).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..search._storage import readonly_url_and_engine_kwargs  # the one rule for every reader
from ..search._study import TrialRecord, objective_split

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
    # the numbers of the trials that recorded ``layers`` (read for a trial's detail alone); None:
    # the records hold every user attribute
    with_layers: Optional[frozenset] = None
    study_id: Optional[int] = field(default=None, compare=False, repr=False)
    reader: Any = field(default=None, compare=False, repr=False)

    def has_layers(self, record) -> bool:
        """Whether the trial recorded a (non-empty) ``layers`` attribute."""
        if self.with_layers is None:
            return bool(record.user_attrs.get("layers"))
        return record.number in self.with_layers

    def detailed(self, records) -> List[TrialRecord]:
        """``records`` holding every user attribute of their trials (what a trial's detail
        shows), read for them alone."""
        records = list(records)
        if self.reader is None or not records:
            return records
        attrs = self.reader.user_attrs(self.study_id, [r.number for r in records])
        out = []
        for record in records:
            full = {**attrs.get(record.number, {}), **record.user_attrs}
            out.append(dataclasses.replace(record, user_attrs=full))
        return out


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
    from ..search._spec import load_study_location
    from ..search._storage import resolve_storage_url

    sources = []
    for ref in spec.studies:
        if ref.spec is not None:
            spec_path = Path(ref.spec)
            if not spec_path.is_absolute():
                spec_path = base_dir / spec_path
            # the study's name and storage (the training stack is not imported to read a study),
            # relative to the spec's folder as the driver resolves them
            study_spec = load_study_location(spec_path)
            spec_dir = spec_path.resolve().parent
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
    from ..search._records import StudyReader

    reader = StudyReader(url)
    try:
        available = reader.study_names()
    finally:
        reader.close()
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


def _safe(records: List[TrialRecord]) -> List[TrialRecord]:
    """The records with what the views rely on made safe whatever the study holds (it may come
    from plain Optuna or another tool): the family is a string or None (constraint values that
    are not numbers were read as NaN: violated)."""
    for record in records:
        if record.family is not None and not isinstance(record.family, str):
            record.family = str(record.family)[:100]
        if not isinstance(record.user_attrs, dict):
            record.user_attrs = {}
    return records


def load_view(source: StudySource, key: str, reader=None) -> StudyView:
    """Read one study (with ``reader``, a :class:`~gsmsearch.search._records.StudyReader` of its
    storage, else one of its own); a study that cannot be read gives a view with ``error`` set."""
    from ..search import redact
    from ..search._records import LAZY_KEYS, VIEW_KEYS, StudyReader

    view = StudyView(key=key, name=source.name, label=source.label, storage=redact(source.url))
    try:
        reader = reader or StudyReader(source.url)
        data = reader.read(source.name, user_keys=VIEW_KEYS, number=_number, lazy_keys=LAZY_KEYS)
        view.directions, view.metric_names = data.directions, data.metric_names
        spec = data.user_attrs.get("spec")
        view.spec = spec if isinstance(spec, dict) else {}
        view.objective_split = objective_split(data.user_attrs)
        view.records = _safe(data.records)
        view.with_layers = frozenset(reader.numbers_with(data.study_id, "layers"))
        view.study_id, view.reader = data.study_id, reader
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
        self._took = 0.0  # how long the last read took
        self._lock = threading.Lock()

    def _list_studies(self) -> None:
        try:
            names = self._storage(self.discover).study_names()
        except Exception as error:  # noqa: BLE001 - shown on the page, tried again next time
            self.listing_error = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return
        self.listing_error = None
        known = {source.name for source in self.sources}
        self.sources += [StudySource(name=n, url=self.discover, label=n) for n in names if n not in known]

    def _storage(self, url: str):
        """The :class:`~gsmsearch.search._records.StudyReader` of ``url`` (one per storage)."""
        from ..search._records import StudyReader

        if url not in self._storages:
            self._storages[url] = StudyReader(url)
        return self._storages[url]

    def views(self, refresh: bool = False) -> List[StudyView]:
        import time

        with self._lock:
            # a read that takes long (a study of 100,000 trials: seconds) is repeated at most every
            # four times its duration, so that the page's first load and its refreshes are not
            # spent reading the same study again
            wait = max(self.max_age, 4 * self._took) if self.max_age else 0.0
            if refresh or self._views is None or time.monotonic() - self._read_at > wait:
                begin = time.monotonic()
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
                self._took = self._read_at - begin
            return self._views
