"""The dashboard spec (``dashboards/NAME.yaml``): which studies to show, and how.

Validated like study specs: unknown keys are rejected, every error names the file, the key path
and what was expected.  Example::

    title: GBLR against hand-crafted structures (digits)
    storage: sqlite:///../studies/quickstart.db   # default for the studies below
    studies:
      - study: quickstart                 # a study name in `storage`
        label: TPE, budget <= 0.5
      - spec: ../studies/quickstart.yaml  # or a study spec (gives name and storage)
    families: [gblr, lowrank, blockdiag, monarch, dense]   # default: every family found
    axes: {x: relative_flops, y: quality, log_x: true}
    hypervolume_reference: {x: 1.0, y: 0.0}   # the same for every family and study
    budgets: [0.1, 0.25, 0.5]                   # "best quality at x <= budget" table
    references:                                 # extra points drawn on every front
      - {label: dense (published), x: 1.0, y: 0.975}
    refresh_seconds: 10

Relative SQLite paths are relative to the dashboard file, as in study specs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, List, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from ..search._spec import METRICS, SpecError, _format_errors, check_storage_url, read_yaml

__all__ = ["DashboardSpec", "StudyRef", "load_dashboard_spec", "dashboard_spec_from_dict"]

#: metrics that are better when larger (every other metric is a cost)
_MAXIMIZED = {name for name, direction in METRICS.items() if direction == "maximize"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_storage_url(url: Optional[str], info: Optional[ValidationInfo] = None) -> Optional[str]:
    """A database URL gsmsearch can read; no password written in it (unless the URL came from the
    command line: validation context ``{"from_command_line": True}``)."""
    from_command_line = bool(info and isinstance(info.context, dict) and info.context.get("from_command_line"))
    return check_storage_url(url, allow_password=from_command_line)


class StudyRef(_Strict):
    """One study to show: ``study`` (a name, in ``storage`` or the spec's default storage) or
    ``spec`` (a study spec file, which names the study and its storage)."""

    study: Optional[str] = Field(None, min_length=1)
    spec: Optional[str] = None
    storage: Optional[str] = None
    label: Optional[str] = Field(None, max_length=200)

    @field_validator("storage")
    @classmethod
    def _storage(cls, url, info: ValidationInfo):
        return _check_storage_url(url, info)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.study is None) == (self.spec is None):
            raise ValueError("give exactly one of study (a name) or spec (a study spec file)")
        return self


def _known_family(name: str) -> str:
    """A registered structured family, or ``dense``."""
    from ..structured import family_names

    known = ["dense"] + [f for f in family_names() if f != "dense"]
    if name not in known:
        raise ValueError(f"unknown family {name!r}; expected one of: {', '.join(known)}")
    return name


FamilyName = Annotated[str, AfterValidator(_known_family)]


class Axes(_Strict):
    x: str = "relative_flops"
    y: str = "quality"
    log_x: bool = True

    @field_validator("x", "y")
    @classmethod
    def _known_metric(cls, metric):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of: {', '.join(METRICS)}")
        return metric

    @model_validator(mode="after")
    def _cost_and_quality(self):
        if self.x in _MAXIMIZED:
            raise ValueError(f"x is the cost axis; {self.x!r} is a quality (put it on y)")
        if self.y not in _MAXIMIZED:
            raise ValueError(f"y is the quality axis; {self.y!r} is a cost (put it on x)")
        if self.x == self.y:
            raise ValueError("x and y must be different metrics")
        return self


class Point(_Strict):
    x: float
    y: float

    @field_validator("x", "y")
    @classmethod
    def _finite(cls, value):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return value


class ReferencePoint(Point):
    label: str = Field(min_length=1, max_length=200)


#: the most studies a dashboard spec file names (a whole storage, from the command line, has no limit)
MAX_STUDIES = 12


class DashboardSpec(_Strict):
    title: str = Field("gsmsearch dashboard", max_length=300)
    storage: Optional[str] = None  # default storage for studies given by name
    studies: List[StudyRef] = Field(default_factory=list)  # 1..MAX_STUDIES in a spec file
    families: Optional[List[FamilyName]] = Field(None, min_length=1)
    axes: Axes = Axes()
    hypervolume_reference: Optional[Point] = None  # default: x = 1 (dense cost), y = 0
    budgets: List[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5], min_length=1, max_length=12)
    # per study: the dominated and infeasible trials drawn, and the trials-table rows beside the
    # front trials; a study with more shows a uniform sample of them (every front trial shown)
    max_points: int = Field(2000, ge=0, le=1_000_000)
    references: List[ReferencePoint] = Field(default_factory=list)
    refresh_seconds: float = Field(10.0, ge=1, le=3600)

    @field_validator("storage")
    @classmethod
    def _storage(cls, url, info: ValidationInfo):
        return _check_storage_url(url, info)

    @field_validator("budgets")
    @classmethod
    def _positive(cls, budgets):
        bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
        if bad:
            raise ValueError(f"budgets are positive numbers on the x axis, got {bad[0]!r}")
        return sorted(set(budgets))

    @model_validator(mode="after")
    def _some_studies(self, info: ValidationInfo):
        # `gsmsearch dashboard --storage URL` alone shows whatever studies the storage holds,
        # none yet included; a spec file names at least one
        if (info.context or {}).get("from_command_line"):
            return self  # --storage alone: every study the storage holds, however many
        if not self.studies:
            raise ValueError("studies: should have at least 1 item (a study name or a spec)")
        if len(self.studies) > MAX_STUDIES:
            raise ValueError(f"studies: should have at most {MAX_STUDIES} items, not {len(self.studies)} "
                             f"(or show a whole storage with `--storage URL` alone)")
        return self

    @model_validator(mode="after")
    def _storage_for_names(self):
        for index, ref in enumerate(self.studies):
            if ref.study is not None and ref.storage is None and self.storage is None:
                raise ValueError(f"studies[{index}] ({ref.study!r}) needs a storage: give storage "
                                 f"at the top level or in the entry, or use spec: instead")
        return self

    @property
    def reference(self) -> Point:
        if self.hypervolume_reference is not None:
            return self.hypervolume_reference
        return Point(x=1.0, y=0.0)


def dashboard_spec_from_dict(data: Any, source: str = "<dashboard spec>", *,
                             from_command_line: bool = False) -> DashboardSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        return DashboardSpec.model_validate(data, context={"from_command_line": from_command_line})
    except ValidationError as error:
        raise SpecError(_format_errors(source, error).replace(
            "see docs/study-yaml.md", "see docs/dashboard.md")) from None


def load_dashboard_spec(path: Union[str, Path]) -> DashboardSpec:
    """A dashboard spec from YAML.  A study spec (it has ``workload``) is accepted too: it becomes
    a dashboard of that one study."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict) and "workload" in data and "studies" not in data:
        return dashboard_spec_from_dict({"title": f"study {data.get('name', path.stem)}",
                                         "studies": [{"spec": str(path.resolve())}]}, str(path))
    return dashboard_spec_from_dict(data, str(path))
