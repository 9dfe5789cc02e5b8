"""The study spec (``study.yaml``): typed, validated, canonicalised and hashed.

Every error names the file, the key path and what was expected; validation happens before any
database is touched, so a bad spec writes nothing.

Limits on what a spec may hold (each refused with an error naming the field, value and bound):

- the file: a regular file (or a link to one) of at most ``MAX_SPEC_BYTES`` (1 MiB); YAML nested
  at most ``MAX_YAML_DEPTH`` (64) levels and expanding, aliases followed, to at most
  ``MAX_YAML_NODES`` (100,000) values, so an alias bomb is refused before it is expanded;
- ``trials`` <= 100,000, ``concurrency`` <= 4,096, ``retries`` <= 100, ``workload.epochs``
  <= 10,000, ``workload.seeds`` <= 1,000 entries;
- a parameter's choices <= ``MAX_CHOICES`` (1,000), and ``MAX_TOTAL_CHOICES`` (10,000) choices in
  all families together;
- ``workdir`` (given, or the default beside the spec) is not the filesystem root, a top-level
  folder such as /home, /var or /tmp itself, nor inside /etc, /usr, /bin, /sbin, /lib*, /boot,
  /dev, /proc, /sys or /run (see :data:`SYSTEM_FOLDERS`).

Values echoed in error messages are cut to a short excerpt.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

__all__ = [
    "SpecError",
    "StudySpec",
    "load_spec",
    "spec_from_dict",
    "METRICS",
    "FAMILY_KNOBS",
    "MAX_SPEC_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "MAX_CHOICES",
    "MAX_TOTAL_CHOICES",
    "SYSTEM_FOLDERS",
    "excerpt",
    "read_text_file",
    "system_folder_problem",
]

#: Largest spec file read (bytes); a spec is a few kilobytes.
MAX_SPEC_BYTES = 1 << 20
#: Deepest nesting of a YAML document (a spec nests about 5 levels).
MAX_YAML_DEPTH = 64
#: Most values (scalars, lists and mappings, keys included) a YAML document may expand to with
#: its aliases followed.
MAX_YAML_NODES = 100_000
#: Most choices one parameter may list, and all parameters of a study together.
MAX_CHOICES = 1_000
MAX_TOTAL_CHOICES = 10_000
#: (folders refused as they are, folders refused with everything inside them) for a workdir.
SYSTEM_FOLDERS = (
    ("/", "/home", "/var", "/opt", "/srv", "/mnt", "/media", "/tmp", "/root", "/var/tmp"),
    ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc",
     "/sys", "/run", "/var/lib", "/var/log", "/var/cache", "/var/spool"),
)


def excerpt(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to about ``limit`` characters: what an error message may echo."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _cut(line: str, limit: int = 600) -> str:
    return line if len(line) <= limit else f"{line[:limit]}... (message cut, {len(line)} characters)"

#: Result metrics a study may use as objectives or constraints, and their natural direction
#: (``quality`` is the workload's metric on the validation split).
METRICS = {
    "quality": "maximize",
    "relative_flops": "minimize",
    "structured_relative_flops": "minimize",
    "relative_linear_flops": "minimize",
    "flops_per_sample": "minimize",
    "params": "minimize",
    "latency_ms": "minimize",
    "train_seconds": "minimize",
}

#: Result values every trial records that no study may select on, and why.
RECORDED_ONLY = {
    "test_quality": "choosing on the test split would leave no unbiased estimate of the front's quality",
    "val_quality": "it is quality itself, under a name that says its split",
}

#: Trial-config fields a family's search space may set (fixed value, choices or a range).
FAMILY_KNOBS = (
    "budget", "lam", "structure_lr", "sigma_init", "sigma_final", "sigma_start_epoch",
    "sigma_end_epoch", "budget_control", "target_mean_width", "budget_anneal_epochs",
    "fit_method", "budget_allocation", "distill", "distill_temperature", "lr", "weight_decay",
    "lr_schedule", "warmup_epochs",
)


class SpecError(ValueError):
    """A study spec that cannot be used; the message names file, key path and expectation."""


class _Strict(BaseModel):
    # strict: `budget: true` or `trials: "5"` is an error, not 1.0 / 5; numbers must be finite
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Range(_Strict):
    """A numeric range to sample from: ``{low: 1e-4, high: 1e-1, log: true}``."""

    low: float
    high: float
    log: bool = False
    step: Optional[float] = None
    int: bool = False

    @model_validator(mode="after")
    def _check(self):
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step must be > 0, got {excerpt(self.step)}")
        return self


class Choices(_Strict):
    """A categorical choice: ``{choices: [0.1, 0.2, 0.3]}``."""

    choices: List[Union[float, int, str, bool, None]] = Field(min_length=1)

    @field_validator("choices", mode="before")
    @classmethod
    def _few_enough(cls, choices):
        if isinstance(choices, list) and len(choices) > MAX_CHOICES:
            raise ValueError(f"{len(choices)} choices; at most {MAX_CHOICES} per parameter")
        return choices


Scalar = Union[float, int, str, bool, None]
Param = Union[Range, Choices, Scalar]


class FamilySpace(_Strict):
    """The search space of one family: trial-config knobs and the family's own options."""

    budget: Param = Choices(choices=[0.25])
    lam: Optional[Param] = None
    structure_lr: Optional[Param] = None
    sigma_init: Optional[Param] = None
    sigma_final: Optional[Param] = None
    sigma_start_epoch: Optional[Param] = None
    sigma_end_epoch: Optional[Param] = None
    budget_control: Optional[Param] = None
    target_mean_width: Optional[Param] = None
    budget_anneal_epochs: Optional[Param] = None
    fit_method: Optional[Param] = None
    budget_allocation: Optional[Param] = None
    distill: Optional[Param] = None
    distill_temperature: Optional[Param] = None
    lr: Optional[Param] = None
    weight_decay: Optional[Param] = None
    lr_schedule: Optional[Param] = None
    warmup_epochs: Optional[Param] = None
    options: Dict[str, Param] = Field(default_factory=dict)  # constructor options of the family

    @field_validator(*FAMILY_KNOBS, mode="before")
    @classmethod
    def _parse(cls, value):
        return _parse_param(value)

    @field_validator("options", mode="before")
    @classmethod
    def _parse_options(cls, value):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of option names to values, got {excerpt(value)}")
        return {key: _parse_param(v) for key, v in value.items()}

    @field_validator("budget")
    @classmethod
    def _budget_fraction(cls, value):
        values = _param_values(value)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1]
        if bad:
            raise ValueError(f"budgets are fractions of the dense FLOPs in (0, 1], got {excerpt(bad[0])}")
        return value


def _parse_param(value):
    """A number/string (fixed), a list (choices), {choices: [...]} or {low, high[, log, step, int]}."""
    if isinstance(value, (Range, Choices)) or value is None or isinstance(value, (int, float, str, bool)):
        return value
    if isinstance(value, list):
        return Choices(choices=value)
    if isinstance(value, dict):
        if "choices" in value:
            return Choices(**value)
        if "low" in value or "high" in value:
            return Range(**value)
    raise ValueError(
        f"expected a value, a list of choices, {{choices: [...]}} or {{low: .., high: .., log: ..}}; "
        f"got {excerpt(value)}"
    )


def _param_values(param) -> list:
    if isinstance(param, Range):
        return [param.low, param.high]
    if isinstance(param, Choices):
        return list(param.choices)
    return [param]


class WorkloadSpec(_Strict):
    name: str
    options: Dict[str, Any] = Field(default_factory=dict)
    mode: Literal["scratch", "finetune"] = "scratch"
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: Optional[int] = Field(None, ge=1, le=1 << 24)
    lr: Optional[float] = Field(None, gt=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    lr_schedule: Optional[Literal["constant", "cosine"]] = None  # None: the workload's
    warmup_epochs: float = Field(0.0, ge=0, le=10_000)
    include: Optional[List[str]] = Field(None, max_length=1_000)
    exclude: List[str] = Field(default_factory=list, max_length=1_000)
    seeds: List[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(default_factory=lambda: [0], min_length=1,
                                                                 max_length=1_000)

    @model_validator(mode="after")
    def _known_options(self):
        """Option names are checked against the workload's constructor (values by the constructor
        itself, in ``_space.workload_errors``; data paths of cluster studies need not exist here)."""
        import inspect

        from ..workloads import resolve_workload

        accepted = [p.name for p in inspect.signature(resolve_workload(self.name)).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
        for option in self.options:
            if option not in accepted:
                raise ValueError(f"workload {self.name!r} has no option {excerpt(option)}; its options are: "
                                 f"{', '.join(accepted) or '(none)'}")
        return self

    @field_validator("name")
    @classmethod
    def _known_workload(cls, name, info: ValidationInfo):
        """A built-in name, ``module.path:ClassName``, ``path/to/file.py:ClassName`` (relative to
        the spec's folder) or an entry-point name, resolved (and a user's code imported) by
        ``workloads._plugins``."""
        from ..workloads import resolve_workload

        if len(name) > 1000:
            raise ValueError(f"a workload name has at most 1000 characters, got {excerpt(name)}")
        resolve_workload(name, spec_dir=(info.context or {}).get("spec_dir"))
        return name


class Objective(_Strict):
    metric: str
    direction: Optional[Literal["maximize", "minimize"]] = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric):
        if metric in RECORDED_ONLY:
            raise ValueError(f"{metric} is recorded for every trial but cannot be an objective or a constraint "
                             f"({RECORDED_ONLY[metric]}); use quality, the workload's metric on the validation split")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {excerpt(metric)}; expected one of: {', '.join(METRICS)}")
        return metric

    @property
    def resolved_direction(self) -> str:
        return self.direction or METRICS[self.metric]


class Constraint(_Strict):
    """``metric <= max`` or ``metric >= min`` (recorded with Optuna's set_constraint)."""

    metric: str
    max: Optional[float] = None
    min: Optional[float] = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric):
        return Objective._known_metric(metric)

    @model_validator(mode="after")
    def _one_bound(self):
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min")
        return self


class Sampler(_Strict):
    name: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    seed: Optional[int] = 0


class Resources(_Strict):
    """What one trial holds.  ``cpus_per_trial`` / ``gpus_per_trial`` are the trial's totals;
    with ``workers_per_trial`` N > 1 the trial runs data-parallel on N workers sharing them evenly
    (``cpus_per_worker`` / ``gpus_per_worker`` give the share instead, and set the totals to N
    times it), in one Ray placement group (``placement``: pack or spread)."""

    cpus_per_trial: float = Field(1.0, gt=0, le=4096)
    gpus_per_trial: float = Field(0.0, ge=0, le=1024)
    workers_per_trial: int = Field(1, ge=1, le=1024)
    cpus_per_worker: Optional[float] = Field(None, gt=0, le=4096)
    gpus_per_worker: Optional[float] = Field(None, ge=0, le=1024)
    placement: Literal["pack", "spread"] = "pack"

    @model_validator(mode="after")
    def _per_worker(self):
        n = self.workers_per_trial
        for kind in ("cpus", "gpus"):
            share, total = getattr(self, f"{kind}_per_worker"), f"{kind}_per_trial"
            if share is None:
                continue
            if total in self.model_fields_set and abs(getattr(self, total) - n * share) > 1e-9 * max(1.0, n * share):
                raise ValueError(f"{total} ({getattr(self, total):g}) must be workers_per_trial x {kind}_per_worker "
                                 f"({n} x {share:g} = {n * share:g}); give one of the two")
            if n * share > (4096 if kind == "cpus" else 1024):
                raise ValueError(f"workers_per_trial x {kind}_per_worker = {n * share:g}, more than a trial may "
                                 f"hold ({total} at most {4096 if kind == 'cpus' else 1024})")
            object.__setattr__(self, total, n * share)
        return self

    @property
    def worker_cpus(self) -> float:
        """CPUs each worker of a trial holds."""
        return self.cpus_per_trial / self.workers_per_trial

    @property
    def worker_gpus(self) -> float:
        """GPUs each worker of a trial holds (a fraction: workers share a device)."""
        return self.gpus_per_trial / self.workers_per_trial

    def worker_options(self) -> Dict[str, Any]:
        """``make_worker``'s keywords beside the trial's totals: none for one worker per trial."""
        if self.workers_per_trial == 1:
            return {}
        return {"workers": self.workers_per_trial, "placement": self.placement}


class PrunerSpec(_Strict):
    """``pruner:``: early stopping of trials against trials of comparable cost (``_pruning``).
    Unset parameters take their defaults (min_epochs 1, reduction_factor 3, min_trials 3,
    cost_factor 1.5)."""

    name: Literal["none", "median", "asha", "successive-halving", "hyperband"] = "none"
    min_epochs: Optional[int] = Field(None, ge=1, le=10_000)  # first epoch a trial may be stopped at
    reduction_factor: Optional[int] = Field(None, ge=2, le=1_000)  # asha, successive-halving, hyperband
    min_trials: Optional[int] = Field(None, ge=1, le=100_000)  # comparable trials needed to decide
    cost_factor: Optional[float] = Field(None, ge=1.0, le=1_000.0)  # comparable: costs within this factor

    @model_validator(mode="after")
    def _parameters_apply(self):
        given = [key for key in ("min_epochs", "reduction_factor", "min_trials", "cost_factor")
                 if getattr(self, key) is not None]
        if self.name == "none" and given:
            raise ValueError(f"{given[0]} is a parameter of a pruner, and name is none; give name: median, asha, "
                             f"successive-halving or hyperband")
        if self.name == "median" and self.reduction_factor is not None:
            raise ValueError("reduction_factor applies to asha, successive-halving and hyperband, not median")
        return self


class Executor(_Strict):
    address: Optional[str] = None  # None: a local Ray; "auto" or "ray://host:port": a cluster
    num_cpus: Optional[int] = Field(None, ge=1, le=4096)  # size of a local Ray (default: all cores)


class StudySpec(_Strict):
    name: str = Field(min_length=1, max_length=200)
    storage: Optional[str] = None  # None: an SQLite file beside the spec
    workdir: Optional[str] = None  # checkpoints and caches; None: beside the spec
    workload: WorkloadSpec
    objectives: List[Objective] = Field(
        default_factory=lambda: [Objective(metric="quality"), Objective(metric="relative_flops")],
        min_length=1,
    )
    constraints: List[Constraint] = Field(default_factory=list, max_length=100)
    families: Dict[str, FamilySpace] = Field(min_length=1)
    sampler: Sampler = Sampler()
    trials: int = Field(ge=1, le=100_000)
    concurrency: int = Field(1, ge=1, le=4096)
    resources: Resources = Resources()
    retries: int = Field(1, ge=0, le=100)
    trial_timeout: Optional[float] = Field(None, gt=0, le=366 * 86400)  # seconds per trial attempt
    executor: Executor = Executor()
    # autocast of the trials' forward passes (float32 master weights; trainer resolve_precision)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("precision")
    @classmethod
    def _precision_runs(cls, precision, info: ValidationInfo):
        resources = info.data.get("resources")
        if precision == "fp16" and resources is not None and not resources.gpus_per_trial > 0:
            raise ValueError("fp16 needs GPU trials (resources.gpus_per_trial > 0): its loss scaling runs on "
                             "CUDA and CPU autocast computes in bfloat16; use bf16 or fp32 on CPUs")
        return precision
    pruner: PrunerSpec = PrunerSpec()

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_by_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name_chars(cls, name):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(
                f"study names use letters, digits, '.', '_' and '-', starting with a letter or digit; "
                f"got {excerpt(name)}"
            )
        return name

    @field_validator("families")
    @classmethod
    def _known_families(cls, families):
        from ..structured import family_names

        known = ["dense"] + [f for f in family_names() if f != "dense"]
        for name in families:
            if name not in known:
                raise ValueError(f"unknown family {excerpt(name)}; expected one of: {', '.join(known)}")
        params = [getattr(space, knob) for space in families.values() for knob in FAMILY_KNOBS]
        params += [param for space in families.values() for param in space.options.values()]
        total = sum(len(p.choices) for p in params if isinstance(p, Choices))
        if total > MAX_TOTAL_CHOICES:
            raise ValueError(f"the families list {total} choices in all; at most {MAX_TOTAL_CHOICES} per study")
        return families

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url):
        return check_storage_url(url)

    @field_validator("workdir")
    @classmethod
    def _not_a_system_folder(cls, workdir):
        if workdir is not None and os.path.isabs(workdir):
            problem = system_folder_problem(Path(workdir))
            if problem:
                raise ValueError(problem)
        return workdir

    @model_validator(mode="after")
    def _objectives_distinct(self):
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"objectives repeat a metric: {metrics}")
        return self

    # -- derived ----------------------------------------------------------------------------
    def canonical(self) -> Dict[str, Any]:
        """The spec as data, fields at their default left out: a later version's new knobs do
        not change the digest of a study written before them (it stays resumable)."""
        return json.loads(self.model_dump_json(exclude_defaults=True))

    def digest(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def directions(self) -> List[str]:
        return [o.resolved_direction for o in self.objectives]

    @property
    def metric_names(self) -> List[str]:
        return [o.metric for o in self.objectives]


def _format_location(loc) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("Range", "Choices", "float", "int", "str", "bool", "none", "function-after[_check(), Range]"):
            continue
        elif "[" in str(item) or "function" in str(item):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _format_errors(source: str, error: ValidationError) -> str:
    lines, seen = [], set()
    for item in error.errors():
        where = _format_location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/study-yaml.md)"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and item["type"] not in ("value_error",):
            message += f" (got {excerpt(item['input'])})"
        # a union reports one failure per branch: keep the first per key path
        if where in seen:
            continue
        seen.add(where)
        lines.append(_cut(f"{source}: {where}: {message}"))
    return "\n".join(lines)


def spec_from_dict(data: Any, source: str = "<spec>", *, spec_dir: Union[str, Path, None] = None) -> StudySpec:
    """The validated spec of ``data``; ``spec_dir`` is the folder a ``workload.name`` of the form
    ``path/to/file.py:ClassName`` is relative to (default: the current folder)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        spec = StudySpec.model_validate(data, context={"spec_dir": spec_dir})
    except ValidationError as error:
        raise SpecError(_format_errors(source, error)) from None
    from ._space import config_errors, workload_errors  # the trainer's and the workload's own checks

    errors = pruner_errors(spec) or config_errors(spec) or workload_errors(spec)
    if errors:
        raise SpecError("\n".join(_cut(f"{source}: {line}") for line in errors))
    return spec


def pruner_errors(spec: StudySpec) -> List[str]:
    """What makes ``spec``'s pruner unusable with the rest of the spec (one line per problem)."""
    pruner = spec.pruner
    if pruner.name == "none":
        return []
    errors = []
    if "quality" not in spec.metric_names or spec.directions[spec.metric_names.index("quality")] != "maximize":
        errors.append(f"pruner.name: {pruner.name} compares trials by their validation quality per epoch; "
                      f"it needs quality (maximized) among the objectives")
    epochs = spec.workload.epochs
    if pruner.min_epochs is not None and pruner.min_epochs >= epochs:
        errors.append(f"pruner.min_epochs: {pruner.min_epochs} is not below workload.epochs ({epochs}); a trial "
                      f"is never stopped at its last epoch, so the pruner would never act")
    elif epochs < 2:
        errors.append(f"pruner.name: {pruner.name} needs workload.epochs of 2 or more (a trial is never stopped "
                      f"at its last epoch), got {epochs}")
    return errors


def check_storage_url(url: Optional[str], *, allow_password: bool = False) -> Optional[str]:
    """A database URL gsmsearch can use (SQLite, PostgreSQL, MySQL), with no literal password
    unless ``allow_password`` (a URL typed on the command line is not written to a file)."""
    if url is None:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(os.path.expandvars(url))
    except ArgumentError:
        raise ValueError(f"not a database URL: {excerpt(url)} (expected e.g. sqlite:///study.db or "
                         "postgresql+psycopg://user@host/db)") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise ValueError(f"unsupported database {excerpt(backend)} in {excerpt(url)}; use sqlite, postgresql "
                         f"or mysql")
    if backend == "sqlite" and (parsed.database or ":memory:") == ":memory:":
        raise ValueError(f"{excerpt(url)} is an in-memory database: the study would be lost when the driver "
                         f"exits; give a file, e.g. sqlite:///study.db")
    if backend == "sqlite" and parsed.query:
        raise ValueError(f"{excerpt(url)}: SQLite URLs take a file path without ?options (the dashboard opens "
                         f"studies read-only by itself)")
    secret_options = sorted(k for k in parsed.query if k.lower() in ("password", "passfile", "sslpassword"))
    if secret_options and not allow_password:
        raise ValueError(f"do not write a password into the spec (?{secret_options[0]}=...); use PGPASSWORD "
                         f"or ~/.pgpass")
    password_from_env = re.search(r"://[^:/@]*:\$\{[A-Za-z_][A-Za-z0-9_]*\}@", url) is not None
    if parsed.password is not None and not password_from_env and not allow_password:
        raise ValueError(
            "do not write a password into the spec; use ${ENV_VAR} in the URL, PGPASSWORD or ~/.pgpass"
        )
    return url


def system_folder_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` (links followed) must not be written into by gsmsearch, or None: it is the
    filesystem root, a top-level folder (/home, /var, /tmp, ...) itself, or inside a system
    hierarchy (/etc, /usr, /dev, /proc, ...); see :data:`SYSTEM_FOLDERS`."""
    resolved = Path(os.path.abspath(str(folder)))
    try:
        resolved = resolved.resolve()
    except (OSError, RuntimeError):  # a link loop: the folder checks of the driver report it
        pass
    exact, trees = SYSTEM_FOLDERS
    if str(resolved) in exact:
        return f"{resolved} is a system folder; choose a folder of your own (e.g. under your home folder)"
    for tree in trees:
        if resolved == Path(tree) or Path(tree) in resolved.parents:
            return f"{resolved} is inside {tree}, a system folder; choose a folder of your own"
    return None


def read_text_file(path: Union[str, Path], *, limit: int = MAX_SPEC_BYTES, what: str = "spec file") -> str:
    """The text of ``path`` if it is a regular file (or a link to one) of at most ``limit``
    bytes, else a SpecError naming it: a FIFO, a device, a socket, a link loop or a huge file is
    refused without blocking or reading it all."""
    import stat

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: cannot read the file: it is a folder") from None
    except OSError as error:  # a link loop, a name too long, no permission, a socket, ...
        raise SpecError(f"{path}: cannot read the file: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SpecError(f"{path}: cannot read the file: it is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(f"{path}: cannot read the file: it is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise SpecError(f"{path}: the file has {info.st_size} bytes; a {what} may have at most {limit}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise SpecError(f"{path}: the file has more than {limit} bytes; a {what} may have at most {limit}")
    except OSError as error:
        raise SpecError(f"{path}: cannot read the file: {error.strerror or error}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text (byte {error.start})") from None


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file names: "a FIFO", "a character device", ..."""
    import stat

    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@functools.lru_cache(maxsize=None)
def _bounded_loader():
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    one silently: `trials: 1` ... `trials: 50` would run 50), nesting deeper than MAX_YAML_DEPTH
    and documents that expand, aliases followed, beyond MAX_YAML_NODES values (an alias bomb
    composes into a small graph but expands exponentially when validated or printed)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            if self._depth >= MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1}, column "
                                f"{mark.column + 1})")
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_document(self, node):
            _check_expansion(node)
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                    except TypeError:  # an unhashable key: the base class reports it
                        break
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {excerpt(key)} is given twice (first on line {seen[key] + 1})",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return BoundedLoader


class _TooLarge(Exception):
    """A YAML document that expands beyond the limits (reported without a YAML position)."""


def _check_expansion(root) -> None:
    """Count the values ``root`` expands to with its aliases followed (each shared node counted
    once per reference), without expanding it: sizes are memoised per node.  Refuses more than
    MAX_YAML_NODES values, nesting deeper than MAX_YAML_DEPTH and a node that contains itself."""
    import yaml

    sizes = {}  # id(node) -> (values it expands to, levels below it)
    open_nodes = set()

    def visit(node, depth):
        if depth > MAX_YAML_DEPTH:
            raise _TooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded")
        key = id(node)
        if key in sizes:
            size, height = sizes[key]
            if depth + height > MAX_YAML_DEPTH:
                raise _TooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded")
            return size, height
        if key in open_nodes:
            raise _TooLarge(f"an alias at line {node.start_mark.line + 1} refers to a node that contains it")
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        open_nodes.add(key)
        size, height = 1, 0
        for child in children:
            child_size, child_height = visit(child, depth + 1)
            size += child_size
            height = max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise _TooLarge(f"the document expands (aliases followed) to more than {MAX_YAML_NODES} "
                                f"values; a spec needs far fewer")
        open_nodes.discard(key)
        sizes[key] = (size, height)
        return size, height

    visit(root, 0)


def read_yaml(path: Union[str, Path]) -> Any:
    """The YAML document in ``path``, or a SpecError naming the file and what went wrong (see the
    module docstring for the limits on the file and the document)."""
    import yaml

    path = Path(path)
    text = read_text_file(path)
    try:
        return yaml.load(text, Loader=_bounded_loader())
    except _TooLarge as error:
        raise SpecError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(_cut(f"{path}: not valid YAML at {where}: {problem}")) from None


class StudyLocation(BaseModel):
    """Where a study spec's study lives: its ``name`` and ``storage``, checked as
    :class:`StudySpec` checks them; every other key is left to :func:`load_spec`."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    name: str = Field(min_length=1, max_length=200)
    storage: Optional[str] = None

    _name_chars = field_validator("name")(StudySpec._name_chars.__func__)
    _storage_url = field_validator("storage")(StudySpec._storage_url.__func__)


def load_study_location(path: Union[str, Path]) -> StudyLocation:
    """A study spec's ``name`` and ``storage``, read as :func:`load_spec` reads the file but
    without validating the rest of the spec (its workload, families, ...), whose checks import the
    training stack: what the read commands (``status``, ``export``, ``report``, ``dashboard``)
    need to find a study."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: (top level): expected a mapping of keys, got {type(data).__name__}")
    try:
        return StudyLocation.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_errors(str(path), error)) from None


def load_spec(path: Union[str, Path]) -> StudySpec:
    data = read_yaml(path)  # a missing file, a link loop, ...: a SpecError naming it
    spec_dir = Path(path).resolve().parent
    spec = spec_from_dict(data, str(path), spec_dir=spec_dir)
    workdir = Path(spec.workdir) if spec.workdir else spec_dir / ".gsmsearch" / spec.name
    if not workdir.is_absolute():
        workdir = spec_dir / workdir
    problem = system_folder_problem(workdir)
    if problem:
        given = "workdir" if spec.workdir else "workdir (the default, beside the spec)"
        raise SpecError(f"{path}: {given}: {problem}")
    return spec
