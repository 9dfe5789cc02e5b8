"""Reading a study's trial records straight from Optuna's database tables, read-only.

``status``, ``export``, ``report`` and the dashboard read every trial of a study; Optuna's
``get_trials`` builds a full FrozenTrial for each (every attribute, parameter distribution and
intermediate value), which on a study of 100,000 trials takes minutes of a read command.  Here
one set-based query per table reads only what a command asks for: the trials' numbers and
states, their objective values, parameters, the constraint system attributes and the user
attributes named in ``user_keys``.  The records equal those :func:`gsmsearch.search.study_records`
builds from Optuna's API (``tests/search/test_records.py`` compares them field by field on SQLite
and PostgreSQL), restricted to those user attributes.

The connections are the read-only ones of :func:`gsmsearch.search._storage.readonly_url_and_engine_kwargs`.
Every storage gsmsearch accepts is one of Optuna's relational databases (SQLite, PostgreSQL,
MySQL), so this is the one path the read commands take.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from ._study import TrialRecord, trial_constraints

__all__ = ["StudyData", "StudyReader", "read_study", "ExportTable", "export_table", "LazyAttrs", "STATUS_KEYS",
           "VIEW_KEYS", "LAZY_KEYS"]

#: the trial user attributes ``status`` reads for every trial: the family, a duplicate's original
#: and the failure reason (the front trials' recorded ``result`` is read for them alone)
STATUS_KEYS = ("family", "duplicate_of", "failure_reason")
#: those the report and the dashboard read for every trial (a trial's ``layers`` are read for the
#: trials whose detail is shown, with :meth:`StudyReader.user_attrs`)
VIEW_KEYS = STATUS_KEYS + ("result", "config", "final", "pruned", "prune_reason")

#: the view attributes the report and the dashboard keep as their stored JSON text, parsed for a
#: trial when something reads them (:class:`LazyAttrs`): the figures need a trial's values,
#: family and constraints, and these (the larger part of the text read) only for the trials shown
LAZY_KEYS = ("result", "config")

#: Optuna's system attribute holding a study's metric names (``Study.set_metric_names``)
_METRIC_NAMES = "study:metric_names"
_CHUNK = 500  # trial ids per IN (...) list: well under every database's bound-parameter limit


@dataclass
class StudyData:
    """A study as read: its directions ("maximize"/"minimize"), metric names (``objective_i``
    where none were set), user attributes and trial records, in trial order."""

    name: str
    study_id: int
    directions: List[str]
    metric_names: List[str]
    user_attrs: Dict[str, Any]
    records: List[TrialRecord] = field(default_factory=list)


_UNPARSED = object()


class _Stored:
    """An attribute's stored JSON text, and its value once parsed."""

    __slots__ = ("text", "value")

    def __init__(self, text: str) -> None:
        self.text, self.value = text, _UNPARSED

    def parsed(self):
        if self.value is _UNPARSED:
            self.value = json.loads(self.text)
        return self.value

    def __eq__(self, other):
        if type(other) is _Stored and self.text == other.text:
            return True  # the same text: the same value, neither parsed
        return self.parsed() == (other.parsed() if type(other) is _Stored else other)

    __hash__ = None


class LazyAttrs(dict):
    """A trial's user attributes, some of them held as their stored JSON text and parsed the first
    time they are read (the text kept beside the parsed value, which is not to be changed in
    place).  It is a dict that reads like the dict of parsed values everywhere: item access,
    ``get``, ``items``, ``values``, iteration, ``dict(...)``, ``{**...}``, equality, ``copy``,
    ``json.dumps`` and pickling all give the parsed values.  Two attributes stored as the same
    text are equal without parsing either (a study re-read unchanged compares at the cost of
    its text)."""

    __slots__ = ()

    def __getitem__(self, key):
        value = dict.__getitem__(self, key)
        return value.parsed() if type(value) is _Stored else value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        # defined here (as dict's own) so that ``dict(...)``, ``{**...}`` and ``update(...)`` read
        # the values through __getitem__, not the stored ones
        return dict.__iter__(self)

    def items(self):
        from collections.abc import ItemsView

        return ItemsView(self)

    def values(self):
        from collections.abc import ValuesView

        return ValuesView(self)

    def pop(self, key, *default):
        if key in self:
            value = self[key]
            dict.__delitem__(self, key)
            return value
        return dict.pop(self, key, *default)

    def popitem(self):
        key = next(reversed(dict.keys(self)))
        return key, self.pop(key)

    def setdefault(self, key, default=None):
        if key in self:
            return self[key]
        dict.__setitem__(self, key, default)
        return default

    def copy(self) -> "LazyAttrs":
        out = LazyAttrs()
        for key in dict.__iter__(self):
            dict.__setitem__(out, key, dict.__getitem__(self, key))
        return out

    def __eq__(self, other):
        if isinstance(other, LazyAttrs):
            return dict.__eq__(self, other)  # value by value: a stored one compares as :class:`_Stored`
        if not isinstance(other, dict):
            return NotImplemented
        return len(self) == len(other) and all(key in other and self[key] == other[key] for key in self)

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None

    def __or__(self, other):
        return dict(self) | other

    def __ror__(self, other):
        return other | dict(self)

    def __repr__(self) -> str:
        return repr(dict(self))

    def __reduce__(self):
        return (dict, (dict(self),))


def _value(value: Optional[float], value_type: str) -> float:
    """Optuna's stored objective value (``TrialValueModel.stored_repr_to_value``)."""
    if value_type == "INF_POS":
        return math.inf
    if value_type == "INF_NEG":
        return -math.inf
    return math.nan if value is None else float(value)


class StudyReader:
    """Read-only access to the studies of one storage URL (one SQLAlchemy engine, its
    connections refusing writes)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy

        from ._storage import OPTUNA_TABLES, _short, readonly_url_and_engine_kwargs, redact, with_retries

        self.url = url
        readonly, engine_kwargs = readonly_url_and_engine_kwargs(url)
        self.engine = sqlalchemy.create_engine(readonly, **engine_kwargs)
        try:
            present = with_retries(lambda: set(sqlalchemy.inspect(self.engine).get_table_names()), attempts=4)
        except Exception as error:  # noqa: BLE001
            self.engine.dispose()
            raise ValueError(f"cannot open storage {redact(url)}: {_short(error)}") from None
        if not set(OPTUNA_TABLES) <= present:
            self.engine.dispose()
            raise ValueError(f"no gsmsearch/Optuna study in {redact(url)} (it has no Optuna tables)")

    def close(self) -> None:
        self.engine.dispose()

    def _rows(self, sql: str, **params) -> list:
        import sqlalchemy

        with self.engine.connect() as connection:
            return connection.execute(sqlalchemy.text(sql), params).all()

    def _raw(self, sql: str) -> list:
        """The rows of ``sql`` (no bound parameters: the values in it are integers and keys of
        this module, written in), as the database driver's tuples: at 100,000 trials SQLAlchemy's
        row objects cost more than the query."""
        with self.engine.connect() as connection:
            cursor = connection.connection.cursor()
            try:
                cursor.execute(sql)
                return cursor.fetchall()
            finally:
                cursor.close()

    def study_names(self) -> List[str]:
        """The storage's studies, in creation order."""
        return [row[0] for row in self._rows("SELECT study_name FROM studies ORDER BY study_id")]

    def state_counts(self) -> Dict[str, Dict[str, int]]:
        """study name -> {trial state: how many trials}."""
        out: Dict[str, Dict[str, int]] = {}
        for name, state, count in self._rows(
                "SELECT s.study_name, t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "GROUP BY s.study_name, t.state"):
            out.setdefault(name, {})[state] = count
        return out

    def read(self, name: str, *, user_keys: Optional[Sequence[str]] = STATUS_KEYS,
             number: Callable[[Any], Any] = float, lazy_keys: Sequence[str] = ()) -> StudyData:
        """The study ``name`` (KeyError when the storage has none of that name), its trials'
        records holding the user attributes ``user_keys`` (None: every one).  ``number``
        converts each constraint value (as :func:`gsmsearch.search._study.trial_constraints`).
        ``lazy_keys``: user attributes parsed only when read (a record holding one has a
        :class:`LazyAttrs`; it reads the same as the parsed dict)."""
        import gc

        # the records are a few objects per trial and attribute, none of them in a reference
        # cycle: the cyclic collector's passes over them while they are made (a third of the
        # read at 100,000 trials) find nothing to free
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._read(name, user_keys, number, lazy_keys)
        finally:
            if collecting:
                gc.enable()

    def _read(self, name: str, user_keys, number, lazy_keys) -> StudyData:
        found = self._rows("SELECT study_id FROM studies WHERE study_name = :name", name=name)
        if not found:
            raise KeyError(name)
        study_id = found[0][0]
        directions = ["maximize" if d == "MAXIMIZE" else "minimize" for (d,) in self._rows(
            "SELECT direction FROM study_directions WHERE study_id = :id ORDER BY objective", id=study_id)]
        study_attrs = {key: json.loads(value) for key, value in self._rows(
            "SELECT key, value_json FROM study_user_attributes WHERE study_id = :id "
            "ORDER BY study_user_attribute_id", id=study_id)}
        names = self._rows("SELECT value_json FROM study_system_attributes WHERE study_id = :id AND key = :key",
                           id=study_id, key=_METRIC_NAMES)
        metric_names = json.loads(names[0][0]) if names else None
        data = StudyData(name=name, study_id=study_id, directions=directions,
                         metric_names=list(metric_names or [f"objective_{i}" for i in range(len(directions))]),
                         user_attrs=study_attrs)
        study_id = int(study_id)
        # the trials with their objective values: one LEFT JOIN per objective (a trial holds
        # each objective's value or none of them)
        objectives = range(len(directions))
        columns = "".join(f", v{k}.value, v{k}.value_type" for k in objectives)
        joins = "".join(f" LEFT JOIN trial_values v{k} ON v{k}.trial_id = t.trial_id AND v{k}.objective = {k}"
                        for k in objectives)
        trials = self._raw(f"SELECT t.trial_id, t.number, t.state{columns} FROM trials t{joins} "
                           f"WHERE t.study_id = {study_id} ORDER BY t.trial_id")
        params = self._params(study_id)
        system = self._attrs("trial_system_attributes", study_id, None, constraints_only=True)
        user = self._attrs("trial_user_attributes", study_id, user_keys, lazy_keys=lazy_keys)
        empty: Dict[str, Any] = {}
        for row in trials:
            trial_id, trial_number, state = row[0], row[1], row[2]
            trial_params = params.get(trial_id, {})
            attrs = user.get(trial_id, {})
            trial_values = ([_value(row[3 + 2 * k], row[4 + 2 * k]) for k in objectives]
                            if objectives and row[4] is not None else None)
            told_duplicate = state == "COMPLETE" and isinstance(attrs.get("duplicate_of"), int)
            data.records.append(TrialRecord(
                number=trial_number, state="PRUNED" if told_duplicate else state,
                family=trial_params.get("family") or attrs.get("family"),
                values=trial_values, params=trial_params, user_attrs=attrs,
                constraints=trial_constraints(system.get(trial_id, empty), number)))
        return data

    def _params(self, study_id: int) -> Dict[int, Dict[str, Any]]:
        from optuna.distributions import json_to_distribution

        distributions: Dict[str, Any] = {}  # one parse per distinct distribution
        out: Dict[int, Dict[str, Any]] = {}
        for trial_id, name, value, distribution in self._raw(
                "SELECT p.trial_id, p.param_name, p.param_value, p.distribution_json FROM trial_params p "
                f"JOIN trials t ON t.trial_id = p.trial_id WHERE t.study_id = {study_id} ORDER BY p.param_id"):
            if distribution not in distributions:
                distributions[distribution] = json_to_distribution(distribution)
            out.setdefault(trial_id, {})[name] = distributions[distribution].to_external_repr(value)
        return out

    def _attrs(self, table: str, study_id: int, keys: Optional[Iterable[str]], *,
               constraints_only: bool = False, lazy_keys: Sequence[str] = ()) -> Dict[int, Dict[str, Any]]:
        """trial id -> {key: value} of the study's trials' attributes in ``table`` (``keys``:
        only those; ``constraints_only``: ``constraints`` and ``constraints:<name>``; the values
        of ``lazy_keys`` are parsed when read, in a :class:`LazyAttrs`)."""
        sql = (f"SELECT a.trial_id, a.key, a.value_json FROM {table} a JOIN trials t ON t.trial_id = a.trial_id "
               f"WHERE t.study_id = {int(study_id)}")
        if constraints_only:
            sql += " AND (a.key = 'constraints' OR a.key LIKE 'constraints:%')"
        elif keys is not None:
            sql += f" AND a.key IN ({_literals(keys)})"
        out: Dict[int, Dict[str, Any]] = {}
        loads = json.loads
        lazy = frozenset(lazy_keys)
        mapping = LazyAttrs if lazy else dict
        # in the database's order (no ORDER BY: sorting 100,000 trials' attribute rows, values
        # and all, costs a third of the query); a trial's attributes are a mapping, as in Optuna
        for trial_id, key, value in self._raw(sql):
            if constraints_only and not (key == "constraints" or key.startswith("constraints:")):
                continue  # SQLite's LIKE ignores case
            attrs = out.get(trial_id)
            if attrs is None:
                attrs = out[trial_id] = mapping()
            if key in lazy:
                dict.__setitem__(attrs, key, _Stored(value))
            else:
                attrs[key] = loads(value)
        return out

    def user_attrs(self, study_id: int, numbers: Iterable[int],
                   keys: Optional[Sequence[str]] = None) -> Dict[int, Dict[str, Any]]:
        """trial number -> its user attributes (``keys``: only those; None: every one), of the
        study's trials numbered ``numbers``."""
        wanted = sorted({int(n) for n in numbers})
        out: Dict[int, Dict[str, Any]] = {n: {} for n in wanted}
        only = f" AND a.key IN ({_literals(keys)})" if keys is not None else ""
        for start in range(0, len(wanted), _CHUNK):
            chunk = ", ".join(str(n) for n in wanted[start:start + _CHUNK])
            for number, key, value in self._raw(
                    "SELECT t.number, a.key, a.value_json FROM trial_user_attributes a JOIN trials t "
                    f"ON t.trial_id = a.trial_id WHERE t.study_id = {int(study_id)} AND t.number IN ({chunk}){only} "
                    "ORDER BY a.trial_user_attribute_id"):
                out[number][key] = json.loads(value)
        return out

    def numbers_with(self, study_id: int, key: str) -> set:
        """The numbers of the study's trials whose user attribute ``key`` holds something (not
        an empty mapping or list, null, false, 0 or ""), its value not read."""
        return {row[0] for row in self._raw(
            "SELECT t.number FROM trial_user_attributes a JOIN trials t ON t.trial_id = a.trial_id "
            f"WHERE t.study_id = {int(study_id)} AND a.key = {_literals([key])} AND a.value_json NOT IN "
            "('{}', '[]', 'null', 'false', '0', '0.0', '\"\"')")}


def _local(moment):
    """A stored naive-UTC datetime as Optuna hands it out: naive local time."""
    import datetime

    if moment is None:
        return None
    if isinstance(moment, str):  # SQLite returns its text
        moment = datetime.datetime.fromisoformat(moment)
    return moment.replace(tzinfo=datetime.timezone.utc).astimezone().replace(tzinfo=None)


def _raw_json(value: str) -> Any:
    """A stored attribute for a flat table: a mapping or list stays the JSON text Optuna stored
    (``json.dumps`` of it, what ``export`` writes for one), anything else is parsed."""
    return value if value[:1] in ("{", "[") else json.loads(value)


#: SQL: the attribute ``a``'s value is a mapping or a list (the text Optuna stored is JSON, no
#: leading space): as :func:`_raw_json` tells them apart
_NESTED_SQL = "substr(a.value_json, 1, 1) IN ('{', '[')"
_ATTR_TABLES = (("trial_user_attributes", "user_attrs", "trial_user_attribute_id"),
                ("trial_system_attributes", "system_attrs", "trial_system_attribute_id"))


def export_table(reader: "StudyReader", data: StudyData):
    """The rows (lists, in the order of the columns) and columns of Optuna's
    ``Study.trials_dataframe`` with attrs number, state, values, params, user_attrs,
    system_attrs, datetime_start, datetime_complete and duration (``multi_index=False``), read
    from the tables; nested user and system attributes (mappings, lists) are their stored JSON
    text instead of Python objects, as ``export`` writes them."""
    table = ExportTable(reader, data, nested_apart=False)
    return table.rows, table.columns


class ExportTable:
    """:func:`export_table`'s rows and columns; with ``nested_apart``, the rows hold none of the
    columns in :attr:`nested` (the attributes that hold a mapping or a list for some trial: the
    bulk of a study's text), which :meth:`nested_rows` reads for a chunk of trials at a time."""

    def __init__(self, reader: "StudyReader", data: StudyData, *, nested_apart: bool = False) -> None:
        self.reader, self.data = reader, data
        study_id = int(data.study_id)
        self.trial_ids: Dict[int, int] = {}
        times = {}
        for trial_id, number, state, start, complete in reader._raw(
                f"SELECT trial_id, number, state, datetime_start, datetime_complete FROM trials "
                f"WHERE study_id = {study_id}"):
            self.trial_ids[number] = trial_id
            times[number] = (state, _local(start), _local(complete))
        #: the columns read apart (``nested_apart``), and their scalar values (a key that holds a
        #: mapping for one trial and a number for another: number -> {column: value})
        self.nested: List[str] = []
        self._scalars: Dict[int, Dict[str, Any]] = {}
        apart: Dict[str, set] = {}
        if nested_apart:
            for table, prefix, _ in _ATTR_TABLES:
                apart[prefix] = {row[0] for row in reader._raw(
                    f"SELECT DISTINCT a.key FROM {table} a JOIN trials t ON t.trial_id = a.trial_id "
                    f"WHERE t.study_id = {study_id} AND {_NESTED_SQL}")}
        nested = {}
        for table, prefix, id_column in _ATTR_TABLES:
            out: Dict[int, Dict[str, Any]] = {}
            kept = apart.get(prefix, set())
            sql = (f"SELECT t.number, a.key, a.value_json FROM {table} a JOIN trials t ON t.trial_id = a.trial_id "
                   f"WHERE t.study_id = {study_id}")
            if nested_apart:
                sql += f" AND NOT {_NESTED_SQL}"
            for number, key, value in reader._raw(sql + f" ORDER BY a.{id_column}"):
                if key in kept:
                    self._scalars.setdefault(number, {})[f"{prefix}_{key}"] = json.loads(value)
                else:
                    out.setdefault(number, {})[key] = _raw_json(value)
            nested[prefix] = out
        names = reader._rows("SELECT value_json FROM study_system_attributes WHERE study_id = :id AND key = :key",
                             id=study_id, key=_METRIC_NAMES)
        metric_names = json.loads(names[0][0]) if names else None
        value_keys = metric_names if metric_names is not None else list(range(len(data.directions)))
        found = {"params": {key for record in data.records for key in record.params},
                 "user_attrs": {key for attrs in nested["user_attrs"].values() for key in attrs},
                 "system_attrs": {key for attrs in nested["system_attrs"].values() for key in attrs}}
        for prefix, keys in apart.items():
            found[prefix] |= keys
            self.nested += [f"{prefix}_{key}" for key in keys]
        columns = ["number", "state"] + [f"values_{key}" for key in value_keys]
        for prefix in ("params", "user_attrs", "system_attrs"):
            columns += [f"{prefix}_{key}" for key in sorted(found[prefix])]
        columns += ["datetime_start", "datetime_complete", "duration"]
        self.columns = columns
        #: the columns of :attr:`rows` (every column but the nested ones read apart)
        self.row_columns = [c for c in columns if c not in set(self.nested)]
        where = {column: index for index, column in enumerate(self.row_columns)}
        missing = float("nan")  # what pandas puts where a row of dicts lacks a column
        # rows as lists (a third of the memory of dicts), each trial's row made and its
        # attributes dropped as it goes
        rows = []
        for record in data.records:
            row = [missing] * len(self.row_columns)
            state, start, complete = times[record.number]  # Optuna's state (a told duplicate's: COMPLETE)
            row[0], row[1] = record.number, state
            values = record.values if record.values is not None else [None] * len(data.directions)
            for key, value in zip(value_keys, values):
                row[where[f"values_{key}"]] = value
            for prefix, attrs in (("params", record.params), ("user_attrs", nested["user_attrs"].pop(record.number, {})),
                                  ("system_attrs", nested["system_attrs"].pop(record.number, {}))):
                for key, value in attrs.items():
                    row[where[f"{prefix}_{key}"]] = value
            row[-3], row[-2] = start, complete
            row[-1] = complete - start if start is not None and complete is not None else None
            rows.append(row)
        self.rows = rows

    def user_attr(self, key: str, numbers: Sequence[int]):
        """(number, parsed value) of the user attribute ``key`` of the trials ``numbers`` that
        hold it, read a chunk of trials at a time (each value parsed as it is handed out)."""
        by_id = {self.trial_ids[n]: n for n in numbers}
        ids = sorted(by_id)
        for start in range(0, len(ids), _CHUNK):
            chunk = ", ".join(str(i) for i in ids[start:start + _CHUNK])
            for trial_id, value in self.reader._raw(
                    f"SELECT a.trial_id, a.value_json FROM trial_user_attributes a "
                    f"WHERE a.trial_id IN ({chunk}) AND a.key = {_literals([key])}"):
                yield by_id[trial_id], json.loads(value)

    def nested_rows(self, numbers: Sequence[int]) -> Dict[int, Dict[str, Any]]:
        """number -> {column: value} of the :attr:`nested` columns of the trials ``numbers``: a
        mapping or list as its stored JSON text, a scalar parsed (a column a trial lacks is
        absent)."""
        out: Dict[int, Dict[str, Any]] = {n: dict(self._scalars.get(n, {})) for n in numbers}
        by_id = {self.trial_ids[n]: n for n in numbers}
        ids = sorted(by_id)
        for start in range(0, len(ids), _CHUNK):
            chunk = ", ".join(str(i) for i in ids[start:start + _CHUNK])
            for table, prefix, _ in _ATTR_TABLES:
                for trial_id, key, value in self.reader._raw(
                        f"SELECT a.trial_id, a.key, a.value_json FROM {table} a "
                        f"WHERE a.trial_id IN ({chunk}) AND {_NESTED_SQL}"):
                    out[by_id[trial_id]][f"{prefix}_{key}"] = value
        return out


def _literals(keys: Iterable[str]) -> str:
    """Attribute keys as SQL string literals: the keys of this module and its callers (letters,
    digits, ``_``, ``:`` and ``.``), refused otherwise."""
    keys = list(keys)
    for key in keys:
        if not re.fullmatch(r"[A-Za-z0-9_:.]+", key):
            raise ValueError(f"not an attribute key this reader writes into SQL: {key!r}")
    return ", ".join(f"'{key}'" for key in keys) or "NULL"


def read_study(url: str, name: str, *, user_keys: Optional[Sequence[str]] = STATUS_KEYS,
               number: Callable[[Any], Any] = float, lazy_keys: Sequence[str] = ()) -> StudyData:
    """:meth:`StudyReader.read` on a reader of its own (closed after)."""
    reader = StudyReader(url)
    try:
        return reader.read(name, user_keys=user_keys, number=number, lazy_keys=lazy_keys)
    finally:
        reader.close()
