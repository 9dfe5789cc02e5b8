"""`gsmsearch launch`: the driver of a study.

The driver is the only process that writes to the study database.  It asks Optuna for trials
(ask/tell), runs them on Ray worker actors, and tells Optuna the results.  :class:`Driver` holds
its phases and :func:`launch` runs them in order: open (create or continue the study), recover
(what a dead driver left), then step after step ask -> submit -> collect -> tell, and shut down.

No configuration runs twice: the sampler's proposal of one that has completed, has failed for
good or is running is recorded PRUNED (``duplicate_of``) and another is asked for; once every
family's space is exhausted the study stops, saying so.  No model is trained twice either: a
proposal whose knob values realise the same model as such a trial (``_realized``: the same
per-layer structure, everything else equal) is recorded as its duplicate, with the trial's
values when it completed, and not trained.  The only re-runs are of a trial left
without a verdict: a retry, or a re-enqueued configuration after a dead driver or Ctrl-C.
With several ``workload.seeds``, a proposed configuration is queued under each other seed too, so
every configuration is measured over all the seeds (``_replicates``).

What survives what:

- a trial that fails (exception, worker crash, time limit) is retried up to ``retries`` times
  from its last per-epoch checkpoint, before any new trial starts; after that it is recorded FAIL
  with its reason, for good (user attribute ``final``), as is a trial that reports it can never
  succeed as configured.  A trial whose every attempt ended with its worker process or node
  dying (nothing its configuration did) is recorded FAIL not final (user attribute
  ``worker_died``): it counts toward the launch's target, so the launch ends, and ``--resume``
  runs it again from its checkpoint.  ``trial_timeout`` counts the time a trial runs, not the
  time it waits for a worker to be placed; on a cluster that lost a node, trials waiting for a worker it
  can no longer place go to the workers that are free;
- a killed driver leaves RUNNING trials behind: the next ``launch --resume`` marks them FAIL
  ("stale", not final) and re-enqueues their configurations, which resume from their checkpoints;
- Ctrl-C or SIGTERM (deferred to the loop's next safe point; a second one interrupts at once)
  stops the running trials, records them FAIL ("interrupted", not final) and exits; ``--resume``
  continues the same way;
- transient database errors (a restarted PostgreSQL, a locked SQLite) are retried for up to
  ``GSMSEARCH_STORAGE_RETRY_SECONDS`` (default 300); a database away longer stops the driver
  (its workers stopped, nothing more written) with :class:`DatabaseUnreachable`, whose message
  names the database and the ``--resume`` command; the trials it left RUNNING are recovered
  by that resume as after a dead driver;
- one driver per study: :class:`~._lock.DriverLock`, a row in the study database taken
  atomically before anything else is written, refreshed by the heartbeat, taken over once stale.

With a ``pruner`` (``_pruning``), the driver reads each running trial's validation quality per
epoch from its worker (:meth:`Driver.read_progress`), records it (user attribute
``epoch_quality``; ``trial.report`` too in a single-objective study) and asks the worker to stop
a trial that falls behind the trials of comparable cost; such a trial is recorded PRUNED with its
curve and the decision (user attributes ``epoch_quality``, ``pruned``, ``prune_reason``).  It is
a verdict: its configuration is never run or resumed again, and it counts as done.
"""
from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple, Union

from ..trainer import TrialConfig
from ._spec import SpecError, StudySpec, load_spec, spec_from_dict, system_folder_problem
from ._lock import DriverLock, DriverLockLost
from ._storage import (DatabaseUnreachable, fail_stale_trials, open_storage, redact, resolve_storage_url,
                       with_retries)
from ._space import family_configurations, space_size, trial_config
from ._realized import Realizer
from ._index import SAMPLER_HISTORY, TrialIndex, bounded_sampler, write_attrs
from ._replicates import replicate_params, waiting_params
from ._pruning import TrialCurve, curve_from_attrs, make_pruner
from ._study import (OBJECTIVE_SPLIT, OBJECTIVE_SPLIT_ATTR, front_records, metric_label, study_hypervolume,
                     study_records)

__all__ = ["launch", "resolve_spec", "Driver", "LaunchSummary", "make_sampler", "study_paths"]

DRIVER_STALE_SECONDS = 60.0
#: a trial whose new worker dies before it is placed is submitted again this often without spending
#: an attempt (a node dying but not yet known dead to Ray takes workers and loses them)
UNSTARTED_RESUBMITS = 3
DUPLICATES_IN_A_ROW = 8  # a family whose sampler repeats finished configurations this often is exhausted
RESULT_SCALARS = (
    "quality", "val_quality", "test_quality", "flops_per_sample", "dense_flops_per_sample", "relative_flops",
    "relative_linear_flops", "structured_relative_flops", "params", "dense_params", "latency_ms",
    "dense_latency_ms", "train_seconds", "epochs_run", "samples_per_second", "peak_memory_bytes",
    "peak_memory_kind", "precision", "world_size",
)
# with a pruner, the driver keeps one progress() call open per running trial; the worker answers
# it at the trial's next epoch (or after PROGRESS_WAIT_SECONDS), and the next call goes out at
# most every PROGRESS_POLL_SECONDS (one database write per trial and interval, however short the epochs)
PROGRESS_POLL_SECONDS = 0.5
PROGRESS_WAIT_SECONDS = 30.0
# after an epoch where the pruner decides, a trial waits for the driver's verdict up to this long
# (it continues without one): a trial stopped there trains no further epoch
VERDICT_WAIT_SECONDS = 10.0


@dataclass
class LaunchSummary:
    study_name: str
    storage: str  # redacted
    completed: int = 0
    failed: int = 0
    pruned: int = 0  # stopped early by the pruner (duplicates not counted)
    to_resume: int = 0  # failed because their worker or node died: ``--resume`` runs them again
    interrupted: bool = False
    front: List[Dict[str, Any]] = field(default_factory=list)
    # per finished trial: seconds from submission to the trial starting in its worker, inside
    # the trial, from its end back to the driver, and recording it in the database; plus the
    # worker's clock at the trial's start and end and the worker (Ray actor) that ran it, from
    # which a benchmark gets each worker's idle time between two trials
    timings: List[Dict[str, Any]] = field(default_factory=list)


def make_sampler(spec: StudySpec):
    import optuna

    name, seed = spec.sampler.name, spec.sampler.seed
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def study_paths(spec: StudySpec, spec_path: Path) -> Dict[str, Path]:
    spec_dir = Path(spec_path).resolve().parent
    workdir = Path(spec.workdir) if spec.workdir else spec_dir / ".gsmsearch" / spec.name
    if not workdir.is_absolute():
        workdir = (spec_dir / workdir).resolve()
    return {
        "spec_dir": spec_dir,
        "workdir": workdir,
        "checkpoints": workdir / "checkpoints",
        "cache": workdir / "cache",
        "structures": workdir / "structures",
    }


class _Display:
    """Progress lines: one per event, and a heartbeat line every ``interval`` seconds."""

    def __init__(self, out: TextIO, total: int, interval: float = 30.0) -> None:
        self.out, self.total, self.interval = out, total, interval
        self.last = 0.0
        self.durations: List[float] = []
        self.index: Optional[TrialIndex] = None  # the driver's, once it has one: no whole-study read per line

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def status(self, study, spec: StudySpec, running: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        if self.index is not None and self.index.study is study:
            index = self.index.refresh()
            counts = index.counts
            done, failed, duplicates, pruned = (counts["record_done"] + index.awaiting_resume(), counts["failed"],
                                                counts["duplicate"], counts["pruned"])
            front = index.front_numbers()
            hv = index.hypervolume(spec.metric_names)
        else:
            records = study_records(study)
            done = sum(1 for r in records if _counts_as_done(r)) + len(_awaiting_resume(records))
            failed = sum(1 for r in records if r.state == "FAIL" and r.user_attrs.get("final", True))
            duplicates = sum(1 for r in records
                             if r.state == "PRUNED" and r.user_attrs.get("duplicate_of") is not None)
            pruned = sum(1 for r in records if _pruned_early(r))
            front = front_records(records, spec.directions)
            hv = study_hypervolume(records, spec.metric_names, spec.directions)
        duplicates_text = f", {duplicates} duplicate{'s' if duplicates > 1 else ''}" if duplicates else ""
        remaining = max(0, self.total - done)
        eta = ""
        if self.durations and remaining:
            per = sum(self.durations) / len(self.durations)
            seconds = per * remaining / max(1, spec.concurrency)
            eta = f", ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"
        hv_text = "" if hv != hv else f", hypervolume {hv:.4f}"
        pruned_text = f", {pruned} pruned" if pruned else ""
        self.line(f"[{spec.name}] {done}/{self.total} done, {running} running, {failed} failed{pruned_text}"
                  f"{duplicates_text}; "
                  f"front {len(front)}{hv_text}{eta}")


def _counts_as_done(record) -> bool:
    """A record with a verdict (see :func:`_finished_for_good`).  The trials that wait for a
    ``--resume`` (:func:`_awaiting_resume`) count as done too; that takes all the records."""
    return (record.state == "COMPLETE" or (record.state == "FAIL" and record.user_attrs.get("final", True))
            or _pruned_early(record))


def _pruned_early(trial) -> bool:
    """A trial the pruner stopped (PRUNED with a ``pruned`` decision; a repeated configuration,
    PRUNED with ``duplicate_of``, is not one)."""
    state = trial.state if isinstance(trial.state, str) else trial.state.name
    return state == "PRUNED" and trial.user_attrs.get("pruned") is not None


@dataclass
class _Running:
    trial: Any
    config: Dict[str, Any]
    digest: str  # of the config: names its checkpoint folder
    worker: Any
    ref: Any
    attempt: int
    started: Optional[float]  # monotonic, once the worker holds its resources: for the time limit
    submitted: float  # wall clock
    placed: Any = None  # a new worker's ``info`` ref until it is placed on a node (None after)
    token: str = ""  # names this attempt to its worker (progress and stop requests)
    progress_ref: Any = None  # a progress() call not answered yet
    polled: float = 0.0  # monotonic time of its last answer
    stop: Any = None  # the pruner's Decision, once the worker was asked to stop



class _DeferredInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, ``ray job stop``, Slurm, a container stop) while the
    driver runs is noted and raised as KeyboardInterrupt at the loop's next safe point
    (:meth:`check`, at the top of each :meth:`Driver.step`), never between asking Optuna for a
    trial and submitting it, nor while a finished trial's result is being recorded (a result
    that has arrived is kept); a second signal interrupts at once.  ``signal_name`` says which
    came.  Only in the main thread (signal handlers live there); elsewhere both behave as usual."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.pending = False
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> "_DeferredInterrupt":
        import signal
        import threading

        if not self._previous and threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._note)
        return self

    def _note(self, signum, frame) -> None:
        import signal

        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        self.signal_name = signal.Signals(signum).name

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        for number, previous in self._previous.items():
            if previous is not None:
                signal.signal(number, previous)
        self._previous = {}


def _inside_ray_package(path: Path) -> Optional[Path]:
    """The folder Ray unpacked a job's ``working_dir`` into (``.../runtime_resources/
    working_dir_files/_ray_pkg_<hash>``) when ``path`` lies inside one, else None."""
    parts = Path(path).parts
    for index, part in enumerate(parts):
        if part.startswith("_ray_pkg_") and "runtime_resources" in parts[:index]:
            return Path(*parts[: index + 1])
    return None


def _check_not_in_ray_package(url: str, workdir: Path, spec_workdir: Optional[str]) -> None:
    """Refuse a study database or workdir inside a Ray Jobs package folder: each submission
    unpacks its ``working_dir`` into a folder named by its content's hash, so the next submission
    (a ``--resume`` after ``ray job stop``) would find neither the study nor its checkpoints."""
    hint = ("Ray unpacks each submission's --working-dir into a folder named by its content, so a later "
            "submission (e.g. with --resume) would not see it")
    if url.startswith("sqlite:///"):
        package = _inside_ray_package(Path(url[len("sqlite:///"):]))
        if package is not None:
            raise SpecError(f"storage: the SQLite file {url[len('sqlite:///'):]} would be inside {package}; {hint}. "
                            f"Set storage to an absolute path (sqlite:////shared/studies/study.db) or a "
                            f"PostgreSQL URL")
    package = _inside_ray_package(workdir)
    if package is not None:
        what = f"workdir {spec_workdir!r}" if spec_workdir else "the default workdir (beside the spec)"
        raise SpecError(f"workdir: {what} would be {workdir}, inside {package}; {hint}. Set workdir to an "
                        f"absolute folder every Ray node sees")


def _check_workdir(workdir: Path) -> None:
    """The workdir can be created (or is a writable folder): checked before anything is written."""
    from ..trainer._trial import folder_problem

    problem = folder_problem(workdir)
    if problem:
        raise ValueError(f"workdir {workdir}: {problem}")


def _spec_changes(stored: Any, spec: StudySpec, limit: int = 6) -> str:
    """What differs between the spec a study was launched with and ``spec``, as
    ``field: old -> new`` items; "" when they are the same study.

    The stored spec is read with today's parser before comparing, so a study written by an older
    gsmsearch, whose canonical form spelled out fields at their defaults, is recognised as the
    same study (its digest differs, its meaning does not)."""
    from pydantic import ValidationError

    if not isinstance(stored, dict):
        return "the study records no spec"
    try:
        before = StudySpec.model_validate(stored)
    except ValidationError:
        return "the recorded spec no longer parses"
    if before.digest() == spec.digest():
        return ""
    items: List[str] = []
    unset = object()  # a key only one side has (a family added or removed)

    def show(value: Any) -> str:
        text = "(absent)" if value is unset else json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    def walk(old: Any, new: Any, where: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                walk(old.get(key, unset), new.get(key, unset), f"{where}.{key}" if where else key)
        elif old != new:
            items.append(f"{where}: {show(old)} -> {show(new)}")

    walk(json.loads(before.model_dump_json()), json.loads(spec.model_dump_json()), "")
    shown = "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")
    return shown or "different digest"


def _check_objective_split(study, name: str) -> None:
    """Refuse (whatever the flags) to add trials to a study whose ``quality`` values are on
    another split than this driver's (:data:`OBJECTIVE_SPLIT`): a study recorded by an older
    gsmsearch, with quality on the test split, and completed trials; their front and this
    driver's trials cannot be compared.  A study with no completed trial has nothing to mix."""
    recorded = study.user_attrs.get(OBJECTIVE_SPLIT_ATTR)
    if recorded == OBJECTIVE_SPLIT:
        return
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return
    where = "on the test split by an older gsmsearch" if recorded is None else f"on the {recorded!r} split"
    raise SpecError(
        f"study {name!r} was recorded with quality {where}; its fronts cannot be mixed with "
        f"validation-selected trials: launch the spec under a new name, or delete the study first "
        f"(optuna delete-study --study-name {name} --storage URL)"
    )


def _open_study(spec: StudySpec, storage, *, resume: bool, force: bool):
    import optuna

    names = [s.study_name for s in with_retries(storage.get_all_studies)]
    sampler = make_sampler(spec)
    if spec.name in names:
        study = with_retries(lambda: optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler))
        stored = study.user_attrs.get("spec_hash")
        if stored != spec.digest() and not force:
            changes = _spec_changes(study.user_attrs.get("spec"), spec)
            if changes:
                raise SpecError(
                    f"study {spec.name!r} was launched with a different spec ({changes}); pass --force "
                    f"to continue it with this spec, or rename the study"
                )
        if list(study.directions) != [
            optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
            for d in spec.directions
        ]:
            raise SpecError(f"study {spec.name!r} has other objectives than this spec; rename the study")
        _check_objective_split(study, spec.name)
        has_trials = bool(study.get_trials(deepcopy=False))
        if has_trials and not (resume or force):
            raise SpecError(
                f"study {spec.name!r} already has {len(study.get_trials(deepcopy=False))} trials; "
                f"pass --resume to continue it"
            )
    else:
        study = with_retries(lambda: optuna.create_study(
            study_name=spec.name, storage=storage, directions=spec.directions, sampler=sampler,
            load_if_exists=True))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            with_retries(lambda: study.set_metric_names(spec.metric_names))
    with_retries(lambda: study.set_user_attr(OBJECTIVE_SPLIT_ATTR, OBJECTIVE_SPLIT))
    with_retries(lambda: study.set_user_attr("spec", spec.canonical()))
    with_retries(lambda: study.set_user_attr("spec_hash", spec.digest()))
    from .. import __version__

    with_retries(lambda: study.set_user_attr("gsmsearch_version", __version__))
    return study


def _finished_for_good(trial) -> bool:
    """A trial with a verdict: COMPLETE, FAIL and not to be run again (``final``; a FAIL
    without the mark counts as final), or stopped by the pruner."""
    name = trial.state.name
    return name == "COMPLETE" or (name == "FAIL" and trial.user_attrs.get("final", True)) or _pruned_early(trial)


def _awaiting_resume(trials) -> List[Any]:
    """The trials (or records) that failed only because their worker or node died (FAIL, not
    ``final``, ``worker_died``), whose configuration no trial has re-enqueued (``requeued_from``)
    or finished for good since.  Each counts toward a launch's target, as a verdict would (a
    launch on a cluster whose workers keep dying ends); ``--resume`` re-enqueues them
    (:func:`_requeue_unfinished`), and from then on the re-enqueued trial is the one that counts."""
    def state(t) -> str:
        return t.state if isinstance(t.state, str) else t.state.name

    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    finished = {t.user_attrs.get("config_digest") for t in trials
                if state(t) == "COMPLETE" or (state(t) == "FAIL" and t.user_attrs.get("final", True))
                or _pruned_early(t)}
    return [t for t in trials if state(t) == "FAIL" and t.user_attrs.get("worker_died")
            and t.user_attrs.get("final", True) is False and t.number not in requeued
            and t.user_attrs.get("config_digest") not in finished]


def _requeue_unfinished(study) -> int:
    """Enqueue again the configurations of trials that stopped without a verdict (stale,
    interrupted, or failed because their worker or node died) and that no trial has finished
    for good since (completed, or failed with ``final``); returns how many.  A re-enqueued trial
    carries ``requeued_from`` (finished trials cannot be updated, so the mark is on the new one)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = {t.user_attrs.get("config_digest") for t in trials if _finished_for_good(t)}
    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    count = 0
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.user_attrs.get("final", True):
            continue
        if trial.number in requeued or trial.user_attrs.get("config_digest") in finished:
            continue
        if not trial.params:
            continue
        with_retries(lambda: study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number},
                                                 skip_if_exists=False))
        count += 1
    return count


def _known_digests(trials) -> Dict[str, int]:
    """config digest -> trial number, for every configuration that must not run again: those
    finished for good (COMPLETE, or FAIL with ``final``) and those running now (``trials``: the
    study's trials, read once by the caller)."""
    known = {}
    for t in trials:
        digest = t.user_attrs.get("config_digest")
        if digest and (_finished_for_good(t) or t.state.name == "RUNNING"):
            known[digest] = t.number
    return known


def _is_duplicate(trial) -> bool:
    """A proposal recorded as the duplicate of another trial (never trained)."""
    return trial.user_attrs.get("duplicate_of") is not None


def _known_realized(trials, key_of) -> Dict[str, int]:
    """realised key -> trial number, for every model that must not be trained again: those of
    the trials finished for good or running (``key_of(trial)``: its realised key, or None), a
    completed trial preferred (its values are what a duplicate tells the sampler)."""
    known: Dict[str, int] = {}
    complete = set()
    for t in trials:
        if _is_duplicate(t) or not (_finished_for_good(t) or t.state.name == "RUNNING"):
            continue
        key = key_of(t)
        if key is None or key in complete:
            continue
        if key not in known or t.state.name == "COMPLETE":
            known[key] = t.number
            if t.state.name == "COMPLETE":
                complete.add(key)
    return known


def _next_trial(study, spec: StudySpec, exhausted: Dict[str, int], trials):
    """Ask for the next trial: a re-enqueued configuration first, else the least-tried family
    among those whose space is not exhausted (``exhausted``: family -> duplicates in a row;
    ``trials``: the driver's :class:`~._index.TrialIndex`, or the study's trials read once by the
    caller).  A family's count is its distinct configurations run or running (by realised key
    where the trial records one, see ``_realized``), so a configuration recorded twice counts
    once against the size of a finite space, and a duplicate, never trained, does not count."""
    from optuna.trial import TrialState

    if isinstance(trials, TrialIndex):
        any_waiting = trials.any_waiting
    else:
        any_waiting = any(t.state == TrialState.WAITING for t in trials)
    if not any_waiting:
        families = [family for family in spec.families if exhausted.get(family, 0) < DUPLICATES_IN_A_ROW]
        if not families:
            return None
        if isinstance(trials, TrialIndex):
            counts = {family: trials.tried_count(family) for family in families}
        else:
            tried: Dict[str, set] = {family: set() for family in families}
            for t in trials:
                family = t.params.get("family")
                if family in tried and not _is_duplicate(t) and (_finished_for_good(t)
                                                                 or t.state == TrialState.RUNNING):
                    tried[family].add(t.user_attrs.get("realized_key") or t.user_attrs.get("config_digest")
                                      or ("trial", t.number))
            counts = {family: len(configs) for family, configs in tried.items()}
        # a family whose finite space has been run entirely gets no more proposals
        counts = {f: c for f, c in counts.items() if (space_size(spec, f) or float("inf")) > c}
        if not counts:
            return None
        family = min(counts, key=lambda f: (counts[f], list(spec.families).index(f)))
        with_retries(lambda: study.enqueue_trial({"family": family}, skip_if_exists=False))
    if isinstance(trials, TrialIndex):
        trials.refresh()  # the trial just queued
        return trials.ask()
    return with_retries(study.ask)


@dataclass
class _Proposal:
    """What one ask gave: a trial with a configuration not run yet (``duplicate_of`` None), or a
    repeat of configuration ``duplicate_of`` (a trial number), already recorded PRUNED."""
    trial: Any
    config: Dict[str, Any]
    digest: str
    duplicate_of: Optional[int] = None


class Driver:
    """One launch of a study, phase by phase (:meth:`preview` alone for ``--dry-run``).
    :func:`launch` runs them in this order:

    - :meth:`open`: create the study, or continue it after the checks of a resume;
    - :meth:`recover`: mark FAIL the trials a dead driver left RUNNING, and re-enqueue them;
    - :meth:`run`: :meth:`step` until no trial is running and none is left to start, then
      :meth:`shutdown` (after :meth:`interrupted` on Ctrl-C);
    - :meth:`summarize`.

    One :meth:`step` is one turn of the loop: the interrupt's safe point, the heartbeat,
    :meth:`fill` (:meth:`ask`, and :meth:`submit` what is not a repeat, until every slot is
    busy), :meth:`collect` (one finished trial: :meth:`tell` its result, or
    :meth:`retry_or_fail`), the time limit, and the progress line.  Ray is touched only by
    :meth:`submit` (through ``make_worker``), :meth:`collect` and the worker kills; every other
    phase reaches only the study."""

    def __init__(self, spec: StudySpec, spec_path, *, paths: Optional[Dict[str, Path]] = None,
                 storage_label: str = "", out: Optional[TextIO] = None, status_interval: float = 30.0,
                 device: Optional[str] = None, make_worker=None) -> None:
        self.spec, self.spec_path = spec, spec_path
        self.paths = paths if paths is not None else study_paths(spec, Path(spec_path))
        self.out = out if out is not None else sys.stderr
        self.device = device or ("cuda" if spec.resources.gpus_per_trial > 0 else "cpu")
        # (cpus, gpus[, workers=, placement=]) -> a worker actor or group; _runner.make_worker
        self.make_worker = make_worker
        self.summary = LaunchSummary(study_name=spec.name, storage=storage_label)
        self.display = _Display(self.out, spec.trials, status_interval)
        self.study = None
        self.running: Dict[Any, _Running] = {}  # Ray object ref -> the trial it will return
        self.idle: List[Any] = []  # workers free for the next trial
        self.placements: Dict[int, List[Dict[str, Any]]] = {}  # trial number -> node of each attempt
        self.worker_deaths: Dict[int, int] = {}  # trial number -> its attempts that ended with its worker dying
        self.unstarted: Dict[int, int] = {}  # trial number -> workers that died before being placed
        self.located: Dict[Any, Dict[str, Any]] = {}  # worker -> where it was placed (its ``info``)
        self.asked: Dict[int, Any] = {}  # trial number -> every trial this launch asked for
        self.exhausted: Dict[str, int] = {}  # family -> duplicates in a row (unbounded spaces)
        self.finite: Dict[str, Any] = {}  # family -> its configurations, where the space is finite
        self.finite_keys: Dict[str, List[Optional[str]]] = {}  # family -> their realised keys
        self.realizer = Realizer()  # realised keys of configurations (``_realized``)
        self.realized_keys: Dict[int, Optional[str]] = {}  # trial number -> key, for trials not recording one
        self.waiting_duplicates: Dict[int, Tuple[Any, int]] = {}  # duplicate's number -> (it, the running original)
        self.exhausted_reported = False
        self.target = spec.trials  # lowered to what was done when every space is exhausted
        self.interrupt = _DeferredInterrupt()  # installed by launch() once Ray is up, else by run()
        self.driver_id = {"pid": os.getpid(), "host": socket.gethostname()}
        self.last_heartbeat = 0.0
        self.lock: Optional[DriverLock] = None  # taken by open()
        self.abandoned = False  # the database is away or the lock lost: write nothing more
        self.pruner = make_pruner(spec)  # None: trials run to their last epoch
        self.curves: Optional[Dict[int, TrialCurve]] = None  # trial number -> its curve (read at first use)
        self.index: Optional[TrialIndex] = None  # the study's trials as the driver reads them (``_index``)

    # -- dry run -----------------------------------------------------------------------------

    def preview(self) -> None:
        """``--dry-run``: the spec's digest, where the study would live, and one example trial per
        family (up to the number of trials), from an in-memory study; writes nothing."""
        import optuna

        spec = self.spec
        study = optuna.create_study(directions=spec.directions, sampler=make_sampler(spec))
        print(f"spec {self.spec_path}: valid (hash {spec.digest()[:12]})", file=self.out)
        print(f"storage: {self.summary.storage}\nworkdir: {self.paths['workdir']}", file=self.out)
        for family in list(spec.families)[: min(len(spec.families), spec.trials)]:
            study.enqueue_trial({"family": family})
            config = trial_config(spec, study.ask(), device=self.device)
            print(f"example trial: {json.dumps(config.to_dict(), sort_keys=True)}", file=self.out)

    # -- open, recover ---------------------------------------------------------------------

    def open(self, url: str, *, resume: bool = False, force: bool = False):
        """Take the study's driver lock (:class:`~._lock.DriverLock`; ``force`` takes it from a
        driver that seems alive), then open the storage at ``url`` and create or continue the
        study (see :func:`_open_study` for what a continuation is refused for).  The lock comes
        first: two drivers started at once on a new database never both create Optuna's tables."""
        self.lock = DriverLock(url, self.spec.name, stale_seconds=DRIVER_STALE_SECONDS)
        self.lock.acquire(force=force)
        try:
            self.study = _open_study(self.spec, open_storage(url), resume=resume, force=force)
        except BaseException:
            self.lock.release()
            raise
        self.trial_index()
        return self.study

    def trial_index(self) -> TrialIndex:
        """The driver's :class:`~._index.TrialIndex` of its study (made at the first call, read
        at the first refresh), and the study's sampler asked through it (``SAMPLER_HISTORY``)."""
        if self.index is None or self.index.study is not self.study:
            self.index = TrialIndex(self.study, self.spec.directions, self.realized_key, history=SAMPLER_HISTORY)
            self.display.index = self.index
            if not hasattr(self.study.sampler, "index"):
                self.study.sampler = bounded_sampler(self.study.sampler, self.index)
            else:
                self.study.sampler.index = self.index
        return self.index

    def recover(self) -> Tuple[int, int]:
        """Mark FAIL ("stale", not final) the trials left RUNNING by a driver that stopped, and
        re-enqueue the configurations left without a verdict; returns (stale, re-enqueued)."""
        stale = fail_stale_trials(self.study, reason="stale: its driver stopped before the trial finished")
        requeued = _requeue_unfinished(self.study)
        if stale or requeued:
            print(f"[{self.spec.name}] marked {len(stale)} stale RUNNING trial(s) FAIL; re-enqueued "
                  f"{requeued} unfinished configuration(s)", file=self.out)
        return len(stale), requeued

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Step until the study is done; Ctrl-C or SIGTERM (deferred to the next step) interrupts
        it.  A database away for longer than the retry bound (:class:`DatabaseUnreachable`) or a
        lock taken by another driver (:class:`~._lock.DriverLockLost`) stops the workers and is
        raised, with nothing more written."""
        self.interrupt.install()
        try:
            self.heartbeat()
            while self.step():
                pass
        except KeyboardInterrupt:
            self.interrupted()
        except (DatabaseUnreachable, DriverLockLost):
            self.abandon()
            raise
        finally:
            self.shutdown()

    def step(self) -> bool:
        """One turn of the loop; False once no trial is running and none was started."""
        self.interrupt.check()
        self.heartbeat()
        self.fill(0)
        if not self.running:
            return False
        self.collect()
        self.enforce_time_limit()
        self.display.status(self.study, self.spec, len(self.running))
        return True

    def heartbeat(self) -> None:
        """Refresh the driver lock, and record this driver and the time on the study (for
        ``status``), at most every quarter of the stale delay."""
        if time.monotonic() - self.last_heartbeat > DRIVER_STALE_SECONDS / 4:
            if self.lock is not None:
                self.lock.refresh()
            with_retries(lambda: self.study.set_user_attr("driver", {**self.driver_id, "heartbeat": time.time()}))
            self.last_heartbeat = time.monotonic()

    def done_count(self, trials=None) -> int:
        """Trials finished for good, duplicates not counted, and those waiting for a ``--resume``
        because their worker or node died (:func:`_awaiting_resume`): of ``trials`` when given,
        else of the study (through the driver's index)."""
        if trials is None:
            index = self.trial_index().refresh()
            return index.done + index.awaiting_resume()
        return (sum(1 for t in trials if _finished_for_good(t) and not _is_duplicate(t))
                + len(_awaiting_resume(trials)))

    def fill(self, unrecorded: int = 0) -> None:
        """Start trials until every slot is busy or the target is reached; ``unrecorded``
        results have arrived but are not in the database yet (they count as done)."""
        in_flight = len(self.running)
        if self.waiting_duplicates:
            self.settle_duplicates()
        while in_flight < self.spec.concurrency:
            if self.interrupt.pending:  # stop asking; the loop stops once this result is recorded
                break
            # one refresh of the driver's index per proposal (the trials changed since the last):
            # the count, the family choice and the duplicate check all see the same trials
            if self.done_count() + unrecorded + in_flight >= self.target:
                break
            proposal = self.ask()
            if proposal is None:
                if not self.exhausted_reported:
                    self.display.line(f"[{self.spec.name}] every family's search space is exhausted "
                                      f"(the samplers only propose configurations already run, or models "
                                      f"already trained)")
                    self.exhausted_reported = True
                self.target = self.done_count() + unrecorded + in_flight
                break
            if proposal.duplicate_of is not None:
                continue
            self.submit(proposal.trial, proposal.config, proposal.digest, attempt=0)
            in_flight += 1

    def ask(self, trials=None) -> Optional[_Proposal]:
        """Ask Optuna for one trial and build its configuration; None when every family's space
        is exhausted.  A configuration that has completed, failed for good or is running is not
        run again, nor is one that realises the same model as such a trial (its realised key,
        ``_realized``): the trial is recorded as a duplicate (see :meth:`set_aside`).  What has
        run is read from the driver's index, refreshed here (``trials``, a caller's read of the
        study, holds the same trials and is not needed)."""
        index = self.trial_index().refresh()
        trial = _next_trial(self.study, self.spec, self.exhausted, index)
        if trial is None:
            return None
        self.asked[trial.number] = trial
        config = trial_config(self.spec, trial, device=self.device).to_dict()
        digest = TrialConfig.from_dict(config).digest()
        family = config["family"]
        known = index.known
        originals = index.known_realized
        if digest in known:
            self.set_aside(trial, family, known, duplicate_of=known[digest], known_realized=originals)
            return _Proposal(trial, config, digest, duplicate_of=known[digest])
        realized = self.realizer.key(config)
        if realized is not None and realized in originals:
            original = index.trial(originals[realized])
            self.set_aside(trial, family, known, duplicate_of=original.number, known_realized=originals,
                           original=original, config=config, realized=realized)
            return _Proposal(trial, config, digest, duplicate_of=original.number)
        self.exhausted[family] = 0
        write_attrs(trial, {"config": config, "config_digest": digest, "realized_key": realized, "family": family})
        self.queue_replicates(trial, known, index, known_realized=originals)
        return _Proposal(trial, config, digest)

    def realized_key(self, trial) -> Optional[str]:
        """``trial``'s realised key: the one it records, else computed from its recorded config
        (a trial of an older gsmsearch), once; None where it has none."""
        if "realized_key" in trial.user_attrs:
            return trial.user_attrs["realized_key"]
        if trial.number not in self.realized_keys:
            config = trial.user_attrs.get("config")
            self.realized_keys[trial.number] = self.realizer.key(config) if isinstance(config, dict) else None
        return self.realized_keys[trial.number]

    def queue_replicates(self, trial, known: Dict[str, int], trials,
                         known_realized: Optional[Dict[str, int]] = None) -> None:
        """Queue ``trial``'s configuration under each other seed of the spec that has not run,
        is not running, is not queued yet and does not realise a model already trained (or
        training), so every configuration is measured over all the seeds (the queue is asked
        before any new configuration; see ``_replicates``)."""
        import optuna

        waiting = trials.waiting_params() if isinstance(trials, TrialIndex) else waiting_params(trials)
        for params in replicate_params(self.spec, trial.params, known=known, waiting=waiting,
                                       device=self.device):
            if known_realized:
                sibling = trial_config(self.spec, optuna.trial.FixedTrial(params), device=self.device)
                if self.realizer.key(sibling) in known_realized:
                    continue
            with_retries(lambda params=params: self.study.enqueue_trial(params, skip_if_exists=False))

    def set_aside(self, trial, family: str, known: Dict[str, int], *, duplicate_of: int,
                  known_realized: Optional[Dict[str, int]] = None, original=None,
                  config: Optional[Dict[str, Any]] = None, realized: Optional[str] = None) -> None:
        """Record ``trial``, not trained, as the duplicate of trial ``duplicate_of``: a repeat of
        its configuration (PRUNED), or, with ``realized`` (its realised key) and ``original``
        (that trial), a configuration that realises the same model.  Such a duplicate of a
        completed trial is told COMPLETE with the original's values and constraints, so the
        sampler learns them at these knob values (an exact repeat adds nothing the sampler does
        not hold already); of a failed one, PRUNED; of a running one, it stays RUNNING (training
        nothing) until that trial finishes (:meth:`settle_duplicates`).  Either way its user
        attributes say ``duplicate_of`` and why (``duplicate_reason``); gsmsearch's records,
        fronts and counts read a told duplicate as PRUNED (``study_records``).

        In a finite space the sampler's turn goes to a configuration not run yet, that realises
        no model trained yet (enqueued, so the next ask gets it: asking again would be a coupon
        collector, and ``DUPLICATES_IN_A_ROW`` repeats would call the family exhausted with
        configurations left); an unbounded family counts the repeat towards being exhausted."""
        from optuna.trial import TrialState

        attrs: Dict[str, Any] = {}
        if realized is not None:
            reason = f"realises the same structure as trial {duplicate_of}"
            attrs.update(config=config, realized_key=realized)
        else:
            reason = f"the same configuration as trial {duplicate_of}"
        write_attrs(trial, {**attrs, "duplicate_of": duplicate_of, "duplicate_reason": reason, "family": family})
        if realized is not None and original is not None and original.state == TrialState.RUNNING:
            self.waiting_duplicates[trial.number] = (trial, original.number)  # told by settle_duplicates
        elif realized is not None and original is not None:
            self.tell_duplicate(trial, original)
        else:
            with_retries(lambda: self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True))
        if realized is not None:
            self.display.line(f"[{self.spec.name}] trial {trial.number} ({family}) not trained: {reason}")
        if family not in self.finite:
            self.finite[family] = family_configurations(self.spec, family, device=self.device)
        if self.finite[family] is None:
            self.exhausted[family] = self.exhausted.get(family, 0) + 1
            return
        unseen = [params for (params, digest), key in zip(self.finite[family], self.finite_realized(family))
                  if digest not in known and (key is None or key not in (known_realized or {}))]
        if unseen:
            choice = random.Random(f"{self.spec.name}/{trial.number}").choice(unseen)
            with_retries(lambda: self.study.enqueue_trial(choice, skip_if_exists=False))
        else:
            self.exhausted[family] = DUPLICATES_IN_A_ROW

    def tell_duplicate(self, trial, original) -> None:
        """Tell Optuna ``trial``, a duplicate of the finished trial ``original``: COMPLETE with its
        values and constraints when it completed, else PRUNED (there are no values to tell)."""
        from optuna.trial import TrialState

        if original.state != TrialState.COMPLETE:
            with_retries(lambda: self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True))
            return
        # its constraints in both forms the original holds (``set_constraint``'s
        # ``constraints:<metric>``, and the list optuna-dashboard reads; see ``record_result``)
        write_attrs(trial, system={key: value for key, value in original.system_attrs.items()
                                   if key.startswith("constraints:") or key == "constraints"})
        values = list(original.values)
        with_retries(lambda: self.study.tell(trial, values, skip_if_finished=True))

    def settle_duplicates(self, trials=None) -> None:
        """Tell Optuna each duplicate that waits for the trial it duplicates (one running when it
        was proposed: it stays RUNNING, training nothing) once that trial has finished
        (``trials``: the study's trials, read by the caller; else the driver's index, refreshed)."""
        from optuna.trial import TrialState

        by_number = {t.number: t for t in trials} if trials is not None else self.trial_index().refresh().trials
        for number, (trial, original) in list(self.waiting_duplicates.items()):
            if by_number[original].state not in (TrialState.RUNNING, TrialState.WAITING):
                self.tell_duplicate(trial, by_number[original])
                del self.waiting_duplicates[number]

    def finite_realized(self, family: str) -> List[Optional[str]]:
        """The realised keys of a finite family's configurations (:attr:`finite`), in order."""
        import optuna

        if family not in self.finite_keys:
            self.finite_keys[family] = [
                self.realizer.key(trial_config(self.spec, optuna.trial.FixedTrial(params), device=self.device))
                for params, _ in self.finite[family]]
        return self.finite_keys[family]

    def submit(self, trial, config: Dict[str, Any], digest: str, attempt: int) -> None:
        """Start ``trial`` on an idle worker, or on a new one.  A new worker may wait for the
        cluster to free resources: its trial's time limit starts once it is placed
        (:meth:`placed`), and an idle worker takes the trial over meanwhile (:meth:`reassign`)."""
        resources = self.spec.resources
        reused = bool(self.idle)
        # workers_per_trial > 1: a group of workers in one placement group (``_runner.WorkerGroup``)
        worker = self.idle.pop() if reused else self.make_worker(resources.cpus_per_trial,
                                                                 resources.gpus_per_trial,
                                                                 **resources.worker_options())
        # ``info`` answers as soon as the worker is placed on a node
        placed = None if reused else worker.info.remote()
        token = f"{trial.number}/{attempt}"
        hold = {}
        if self.pruner is not None:  # the epochs where the pruner may stop it: it waits there for the verdict
            hold = {"hold_at": self.pruner.rungs(TrialCurve.from_config(trial.number, config, digest)),
                    "hold_seconds": VERDICT_WAIT_SECONDS}
        ref = worker.run.remote(
            config, str(self.paths["checkpoints"] / digest), str(self.paths["cache"]),
            str(self.paths["structures"] / f"trial-{trial.number}.safetensors"), token=token, **hold,
        )
        entry = _Running(trial, config, digest, worker, ref, attempt, started=time.monotonic() if reused else None,
                         submitted=time.time(), placed=placed, token=token)
        self.running[ref] = entry
        if reused:
            self.record_placement(entry, self.located.get(worker, {}))
        if self.pruner is not None:  # open at once: the worker answers at the trial's first epoch
            entry.progress_ref = worker.progress.remote(token, PROGRESS_WAIT_SECONDS)

    def collect(self, timeout: float = 1.0) -> None:
        """Wait up to ``timeout`` seconds for a trial to return, a new worker to be placed or
        (with a pruner) an epoch to be reported (:meth:`on_epochs`); retry a trial whose worker
        died or raised, else hand its worker to a trial still waiting for one (retries first),
        start the next trial, and :meth:`tell` its outcome."""
        import ray

        from ._runner import describe_failure

        calls = self.progress_calls()  # with a pruner: an epoch reported also ends the wait
        waiting = {entry.placed: entry for entry in self.running.values() if entry.placed is not None}
        ready, _ = ray.wait(list(self.running) + list(waiting) + list(calls), num_returns=1, timeout=timeout)
        self.read_progress(calls)
        for ref in ready:
            if ref in waiting:
                if waiting[ref].ref in self.running:
                    self.placed(waiting[ref])
                continue
            if ref not in self.running:
                continue
            entry = self.running.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - nothing a trial raises ends the driver
                if entry.stop is not None:  # asked to stop: the decision stands, nothing to retry
                    _kill(entry.worker)
                    self.record_pruned(entry, {})
                    continue
                reason = describe_failure(error)
                self.retry_or_fail(entry, reason)
                continue
            if entry.placed is not None:  # it returned before its placement was seen
                self.placed(entry)
                entry.started = time.monotonic() - (outcome["finished"] - outcome["started"])
            self.idle.append(entry.worker)
            received = time.time()
            # keep the worker busy: a trial waiting for a worker first, then the next trial,
            # then write this result
            self.reassign()
            self.fill(1)
            self.tell(entry, outcome, received)

    def placed(self, entry: _Running) -> None:
        """``entry``'s new worker holds its resources: the trial's time limit starts, and the
        node it runs on is recorded (``placements``: one per attempt)."""
        import ray

        try:
            where = ray.get(entry.placed)
        except Exception as error:  # noqa: BLE001 - the worker died before it ran: its run ref says so
            entry.placed = None  # waited on no more
            self.display.line(f"[{self.spec.name}] trial {entry.trial.number}: its worker did not start "
                              f"({type(error).__name__})")
            return
        entry.placed, entry.started = None, time.monotonic()
        self.located[entry.worker] = where
        self.record_placement(entry, where)

    def record_placement(self, entry: _Running, where: Dict[str, Any]) -> None:
        attempts = self.placements.setdefault(entry.trial.number, [])
        attempts.append({"attempt": entry.attempt + 1, "node_id": where.get("node"), "host": where.get("host"),
                         "pid": where.get("pid")})
        with_retries(lambda: entry.trial.set_user_attr("placements", attempts))

    def reassign(self) -> None:
        """Give idle workers the trials whose new worker waits for resources the cluster no
        longer has (it lost a node: the placed workers already fill it), retries first, then in
        the order they were submitted.  Without this, a retry would wait behind every new trial,
        and a trial whose worker can never be placed would wait forever.  A new worker that is
        merely starting, on a cluster with room for it, keeps its trial."""
        import ray

        while self.idle:
            waiting = [entry for entry in self.running.values() if entry.placed is not None]
            if not waiting:
                return
            placed = len(self.idle) + sum(1 for entry in self.running.values() if entry.placed is None)
            if placed < self.capacity():
                return
            entry = min(waiting, key=lambda e: (-e.attempt, e.submitted))
            if ray.wait([entry.placed], timeout=0)[0]:  # placed meanwhile: it runs where it is
                self.placed(entry)
                continue
            self.running.pop(entry.ref)
            _kill(entry.worker)
            self.located.pop(entry.worker, None)
            self.submit(entry.trial, entry.config, entry.digest, entry.attempt)

    def capacity(self) -> int:
        """How many trial workers the Ray cluster's live nodes hold at once."""
        import ray

        total, wanted = ray.cluster_resources(), self.spec.resources
        slots = [total.get("CPU", 0.0) / wanted.cpus_per_trial]
        if wanted.gpus_per_trial > 0:
            slots.append(total.get("GPU", 0.0) / wanted.gpus_per_trial)
        return int(min(slots) + 1e-9)

    # -- early stopping ---------------------------------------------------------------------

    def progress_calls(self) -> Dict[Any, _Running]:
        """With a pruner: the open progress() call of every running trial (one is opened where
        none is, at most every :data:`PROGRESS_POLL_SECONDS` per trial), by Ray object ref."""
        if self.pruner is None:
            return {}
        now = time.monotonic()
        calls = {}
        for entry in self.running.values():
            if entry.progress_ref is None and now - entry.polled >= PROGRESS_POLL_SECONDS:
                entry.progress_ref = entry.worker.progress.remote(entry.token, PROGRESS_WAIT_SECONDS)
            if entry.progress_ref is not None:
                calls[entry.progress_ref] = entry
        return calls

    def read_progress(self, calls: Dict[Any, _Running]) -> None:
        """:meth:`on_epochs` the answers among ``calls`` that have arrived (without waiting)."""
        if not calls:
            return
        import ray

        answered, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
        for ref in answered:
            entry = calls[ref]
            entry.progress_ref, entry.polled = None, time.monotonic()
            try:
                epochs = ray.get(ref)
            except ray.exceptions.RayError:  # a dead worker: collect() sees its trial's end
                continue
            if epochs and any(e is entry for e in self.running.values()):
                self.on_epochs(entry, epochs)

    def trial_curves(self) -> Dict[int, TrialCurve]:
        """Every trial's validation curve: the study's (read once, at the first call) and this
        launch's.  A configuration recorded by several trials (an interrupted attempt and its
        re-run) counts once, by its longest curve."""
        if self.curves is None:
            self.curves = {}
            by_digest: Dict[str, TrialCurve] = {}
            for trial in with_retries(lambda: self.study.get_trials(deepcopy=False)):
                curve = curve_from_attrs(trial.number, trial.user_attrs)
                if curve is None:
                    continue
                kept = by_digest.get(curve.digest)
                if curve.digest and kept is not None and len(kept.qualities) >= len(curve.qualities):
                    continue
                if curve.digest:
                    if kept is not None:
                        self.curves.pop(kept.number, None)
                    by_digest[curve.digest] = curve
                self.curves[trial.number] = curve
        return self.curves

    def curve_of(self, entry: _Running) -> TrialCurve:
        curves = self.trial_curves()
        number = entry.trial.number
        if number not in curves:
            # a configuration re-run after an interruption replaces the curve of its earlier trial
            for other in [c for c in curves.values() if c.digest and c.digest == entry.digest]:
                curves.pop(other.number, None)
            curves[number] = TrialCurve.from_config(number, entry.config, entry.digest)
        return curves[number]

    def on_epochs(self, entry: _Running, epochs: List[Dict[str, Any]]) -> None:
        """Record a running trial's new epochs (user attribute ``epoch_quality``; ``trial.report``
        where the study has a single objective: Optuna refuses it in multi-objective studies)
        and, unless it was asked already, ask its worker to stop when the pruner says so."""
        curve = self.curve_of(entry)
        new = [item for item in epochs if item.get("quality") is not None]
        for item in new:
            curve.qualities[int(item["epoch"])] = float(item["quality"])
        if not new:
            return
        with_retries(lambda: entry.trial.set_user_attr("epoch_quality", curve.as_list()))
        if len(self.spec.metric_names) == 1:
            for item in new:
                try:
                    entry.trial.report(float(item["quality"]), step=int(item["epoch"]))
                except Exception:  # noqa: BLE001 - a step reported before (a resumed attempt): Optuna keeps the first
                    pass
        if entry.stop is not None:
            return
        others = [c for n, c in self.trial_curves().items() if n != curve.number]
        rungs = set(self.pruner.rungs(curve))
        for item in new:
            epoch = int(item["epoch"])
            decision = self.pruner.decide(curve, epoch, others)
            if decision is not None:
                entry.stop = decision
                entry.worker.stop.remote(entry.token, decision.reason)
                self.display.line(f"[{self.spec.name}] trial {entry.trial.number} ({entry.config['family']}) "
                                  f"stops early: {decision.reason}")
                return
            if epoch in rungs:  # the trial waits after this epoch for the verdict: it continues
                entry.worker.proceed.remote(entry.token, epoch)

    def enforce_time_limit(self) -> None:
        """Retry (or fail) every trial running longer than ``trial_timeout``; the time a trial
        waits for its worker to be placed does not count."""
        if self.spec.trial_timeout is None:
            return
        now = time.monotonic()
        for ref, entry in list(self.running.items()):
            if entry.started is not None and now - entry.started > self.spec.trial_timeout:
                self.running.pop(ref)
                self.retry_or_fail(entry, f"exceeded trial_timeout of {self.spec.trial_timeout:g}s")

    def retry_or_fail(self, entry: _Running, reason: str) -> None:
        """Stop ``entry``'s worker; resubmit the trial from its last checkpoint while it has
        retries left, served before any new trial (:meth:`reassign`); then record it failed: for
        good, unless every attempt ended with its worker process or node dying (``reason``
        "worker died: ...", out of memory excepted: its configuration may need more than a node
        has), nothing its configuration did; such a trial is recorded not final, with
        ``worker_died``: it counts toward this launch's target (:func:`_awaiting_resume`) and
        ``--resume`` runs it again from its checkpoint."""
        _kill(entry.worker)
        self.located.pop(entry.worker, None)
        number = entry.trial.number
        if (entry.started is None and reason.startswith("worker died:")
                and self.unstarted.get(number, 0) < UNSTARTED_RESUBMITS):
            # its worker died before it was placed (e.g. on a node dying but not yet known dead):
            # the trial did not run, so this costs no attempt; bounded, for workers that never start
            self.unstarted[number] = self.unstarted.get(number, 0) + 1
            self.display.line(f"[{self.spec.name}] trial {number}: its worker died before it started ({reason}); "
                              f"submitted again (not counted as an attempt)")
            self.submit(entry.trial, entry.config, entry.digest, entry.attempt)
            self.reassign()
            return
        if reason.startswith("worker died:") and "OutOfMemoryError" not in reason:
            self.worker_deaths[number] = self.worker_deaths.get(number, 0) + 1
        if entry.attempt < self.spec.retries:
            self.display.line(f"[{self.spec.name}] trial {entry.trial.number} attempt {entry.attempt + 1} failed "
                              f"({reason}); retrying from its last checkpoint")
            self.submit(entry.trial, entry.config, entry.digest, entry.attempt + 1)
            self.reassign()
        elif self.worker_deaths.get(number, 0) == entry.attempt + 1:
            self.record_failure(entry.trial, entry.config["family"],
                                f"{reason} (after {entry.attempt + 1} attempt(s)): its worker or node died, nothing "
                                f"its configuration did; `launch --resume` runs it again from its checkpoint",
                                final=False, worker_died=True)
        else:
            self.record_failure(entry.trial, entry.config["family"],
                                f"{reason} (after {entry.attempt + 1} attempt(s))", final=True)

    # -- recording -------------------------------------------------------------------------

    def tell(self, entry: _Running, outcome: Dict[str, Any], received: float) -> None:
        """Record a returned trial: its orchestration timing, then its result (or the failure
        the worker reported), and the timing record of :attr:`LaunchSummary.timings`."""
        timing = self.record_orchestration(entry, outcome, received)
        if outcome.get("pruned") and entry.stop is not None:
            self.record_pruned(entry, outcome)
        elif outcome["ok"]:
            self.record_result(entry, outcome["result"])
        else:
            self.record_failure(entry.trial, entry.config["family"], outcome["reason"], final=True)
        timing["record_s"] = time.time() - received
        self.summary.timings.append({**timing, "started": outcome["started"], "finished": outcome["finished"],
                                     "worker": outcome.get("actor_id")})

    def record_orchestration(self, entry: _Running, outcome: Dict[str, Any], received: float) -> Dict[str, float]:
        timing = {
            "submit_to_start_s": outcome["started"] - entry.submitted,
            "run_s": outcome["finished"] - outcome["started"],
            "return_s": received - outcome["finished"],
        }
        write_attrs(entry.trial, {"timing": timing, "ray_actor_id": outcome.get("actor_id"),
                                  "node_id": outcome.get("node_id"), "host": outcome.get("host"),
                                  "attempts": entry.attempt + 1})
        return timing

    def record_result(self, entry: _Running, result: Dict[str, Any]) -> None:
        """Tell Optuna a trial's objective values and constraints, with the result's scalars,
        per-layer summary and curves as user attributes; a result without one of the objectives
        is recorded as a failure for good."""
        spec, trial = self.spec, entry.trial
        values = []
        for metric in spec.metric_names:
            value = result.get(metric)
            if value is None or value != value:
                self.record_failure(trial, entry.config["family"],
                                    f"metric {metric!r} missing from the trial's result", final=True)
                return
            values.append(float(value))
        violations = []
        system = {}  # ``Trial.set_constraint``'s form: ``constraints:<metric>``
        for constraint in spec.constraints:
            value = float(result[constraint.metric])
            violation = value - constraint.max if constraint.max is not None else constraint.min - value
            if violation != violation:  # as ``Trial.set_constraint`` refuses it
                raise ValueError(f"Attempted to set a constraint for {constraint.metric!r}, but NaN is not allowed.")
            system[f"constraints:{constraint.metric}"] = violation
            violations.append(violation)
        if violations and self.records_constraint_list():  # also Optuna's list form, which optuna-dashboard reads
            system["constraints"] = violations
        attrs = {k: result[k] for k in RESULT_SCALARS if k in result}
        attrs["test_metrics"] = result.get("test_metrics", {})
        attrs["resolved"] = result.get("resolved", {})  # what the config's defaults meant
        write_attrs(trial, {"result": attrs, "layers": result.get("layers", {}), "curves": result.get("curves", [])},
                    system=system)
        if self.pruner is not None:  # the whole curve, also the epochs no poll saw
            finished = curve_from_attrs(trial.number, {"config": entry.config, "config_digest": entry.digest,
                                                       "curves": result.get("curves", [])})
            if finished is not None:
                self.curve_of(entry).qualities.update(finished.qualities)
        with_retries(lambda: self.study.tell(trial, values, skip_if_finished=True))
        if entry.started is not None:
            self.display.durations.append(time.monotonic() - entry.started)
        shown = ", ".join(f"{metric_label(m, OBJECTIVE_SPLIT)} {v:.4g}" for m, v in zip(spec.metric_names, values))
        self.display.line(f"[{spec.name}] trial {trial.number} ({entry.config['family']}) done: {shown}")

    def records_constraint_list(self) -> bool:
        """Whether a result's constraints also go into the list under the trial's ``constraints``
        system attr (the spec's order) beside ``set_constraint``'s ``constraints:<metric>``: yes,
        except in a GPSampler study whose completed trials were recorded with the named form
        alone (by an older gsmsearch), because Optuna's GPSampler refuses trials that hold
        different numbers of constraints.  Decided once per driver."""
        if getattr(self, "_constraint_list", None) is None:
            from optuna.trial import TrialState

            self._constraint_list = True
            if self.spec.sampler.name == "gp":
                done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                self._constraint_list = all("constraints" in t.system_attrs for t in done
                                            if any(key.startswith("constraints:") for key in t.system_attrs))
        return self._constraint_list

    def record_pruned(self, entry: _Running, outcome: Dict[str, Any]) -> None:
        """Tell Optuna a trial the pruner stopped is PRUNED (the sampler learns it), with its
        validation curve (``epoch_quality``), the decision (``pruned``: rule, epoch, value,
        threshold, the comparable trials) and ``prune_reason``; it counts as done and its
        configuration is never run again (:func:`_finished_for_good`)."""
        from optuna.trial import TrialState

        trial, decision = entry.trial, entry.stop
        curve = self.curve_of(entry)
        for item in outcome.get("curve") or []:
            if item.get("quality") is not None:
                curve.qualities[int(item["epoch"])] = float(item["quality"])
        # the epoch it stopped after (its last reported one where its worker died after the request)
        stopped = outcome.get("epochs") or (max(curve.qualities) if curve.qualities else None)
        record = {**decision.to_dict(), "stopped_after_epoch": stopped}
        record.pop("reason", None)
        with_retries(lambda: trial.set_user_attr("epoch_quality", curve.as_list()))
        with_retries(lambda: trial.set_user_attr("pruned", record))
        with_retries(lambda: trial.set_user_attr("prune_reason", decision.reason[:2000]))
        with_retries(lambda: self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True))
        self.display.line(f"[{self.spec.name}] trial {trial.number} ({entry.config['family']}) PRUNED after epoch "
                          f"{stopped if stopped is not None else '?'} (decided at epoch {decision.epoch})")

    def record_failure(self, trial, family: str, reason: str, *, final: bool, worker_died: bool = False) -> None:
        """Tell Optuna ``trial`` FAILED, with its reason and whether it is ``final`` (not
        final: ``--resume`` runs its configuration again); ``worker_died``: every attempt lost
        its worker or node (user attribute ``worker_died``, see :func:`_awaiting_resume`)."""
        from optuna.trial import TrialState

        with_retries(lambda: trial.set_user_attr("failure_reason", reason[:2000]))
        with_retries(lambda: trial.set_user_attr("final", final))
        if worker_died:
            with_retries(lambda: trial.set_user_attr("worker_died", True))
        with_retries(lambda: self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
        self.display.line(f"[{self.spec.name}] trial {trial.number} ({family}) FAILED: {reason}")

    # -- stop ------------------------------------------------------------------------------

    def interrupted(self) -> None:
        """After Ctrl-C: stop the running trials and record every trial this driver asked for and
        left unfinished as interrupted (FAIL, not final), so that ``--resume`` runs it again."""
        from optuna.trial import TrialState

        self.summary.interrupted = True
        how = "SIGTERM" if self.interrupt.signal_name == "SIGTERM" else "Ctrl-C"
        reason = f"interrupted ({how}); `launch --resume` runs it again from its checkpoint"
        for entry in self.running.values():
            _kill(entry.worker)
            self.record_failure(entry.trial, entry.config["family"], reason, final=False)
        # a trial this driver asked for that is in no slot (Ctrl-C between the ask and the
        # submission, or while a dead worker's trial was being resubmitted) is still RUNNING
        # in the database: it is interrupted too, not left for the stale check of a later launch
        running_now = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for number in sorted(running_now & set(self.asked)):
            trial = self.asked[number]
            self.record_failure(trial, trial.params.get("family", "?"), reason, final=False)
        print(f"[{self.spec.name}] stopped; continue with: {resume_command(self.spec_path)}", file=self.out)

    def abandon(self) -> None:
        """Stop every worker and write nothing more (the database is away, or another driver
        holds the study now): the trials left RUNNING are recovered by the next resume."""
        self.abandoned = True
        for entry in self.running.values():
            _kill(entry.worker)
        self.running.clear()

    def shutdown(self) -> None:
        """Give Ctrl-C and SIGTERM back their usual handlers, clear this driver from the study and
        release its lock (so the next launch need not wait for the heartbeat to go stale) and
        stop the idle workers."""
        self.interrupt.restore()
        if not self.abandoned:
            try:
                with_retries(lambda: self.study.set_user_attr("driver", None), attempts=3)
            except Exception:  # noqa: BLE001 - the database may be the thing that failed
                pass
        if self.lock is not None:
            self.lock.release()
        for worker in self.idle:
            _kill(worker)

    def summarize(self) -> LaunchSummary:
        """Fill the summary from the study as it now is, and print the last progress line."""
        spec, summary = self.spec, self.summary
        index = self.trial_index().refresh()  # the counts and the front of study_records, without reading them all
        summary.completed = index.counts["state:COMPLETE"]  # a told duplicate reads PRUNED there
        summary.failed = index.counts["failed"]
        summary.pruned = index.counts["pruned"]
        summary.to_resume = index.awaiting_resume()
        # beside the objectives, each member's test quality: measured, never selected on
        members = [index.trial(number) for number in index.front_numbers()]
        summary.front = [
            {"number": t.number, "family": t.params.get("family") or t.user_attrs.get("family"),
             **dict(zip(spec.metric_names, t.values)),
             "test_quality": (t.user_attrs.get("result") or {}).get("test_quality")}
            for t in members
        ]
        self.display.status(self.study, spec, 0, force=True)
        return summary


def _kill(worker) -> None:
    from ._runner import kill_worker

    kill_worker(worker)  # a worker actor, or every rank of a data-parallel trial


def resume_command(label) -> str:
    """How to continue a study launched from ``label``: a spec file's path (the CLI command), or
    ``"<dict spec>"`` / ``"<StudySpec>"`` (:func:`resolve_spec`: the Python call)."""
    if str(label) in ("<dict spec>", "<StudySpec>"):
        return "gsmsearch.launch(spec, resume=True) with the same spec"
    return f"gsmsearch launch {label} --resume"


def resolve_spec(spec: Union[str, Path, Dict[str, Any], StudySpec], *,
                 base_dir: Union[str, Path, None] = None) -> Tuple[StudySpec, Path, Any]:
    """(spec, the path its relative paths are resolved against, its label) for a spec file, a
    dict or a :class:`StudySpec`; a dict is checked as a spec file is (:class:`SpecError` naming
    the key), and a dict's or a StudySpec's relative ``storage`` and ``workdir`` (and a dict's
    ``workload.name`` file) are relative to ``base_dir`` (default: the current folder), the
    folder a spec file's would be relative to."""
    if isinstance(spec, (str, Path)):
        if base_dir is not None:
            raise ValueError("base_dir applies to a dict or a StudySpec; a spec file's paths are relative "
                             "to its own folder")
        return load_spec(spec), Path(spec), spec
    if not isinstance(spec, (dict, StudySpec)):
        raise TypeError(f"spec must be a spec file path, a dict or a StudySpec, got {type(spec).__name__}")
    label = "<dict spec>" if isinstance(spec, dict) else "<StudySpec>"
    folder = Path(base_dir) if base_dir is not None else Path.cwd()
    if not folder.is_dir():
        raise SpecError(f"{label}: base_dir {folder}: not a folder")
    if isinstance(spec, dict):  # a workload.name path/to/file.py:Class is relative to base_dir too
        spec = spec_from_dict(spec, label, spec_dir=folder.resolve())
    # a file that is never read: study_paths and the storage take its folder as the spec's folder
    spec_path = folder.resolve() / "spec.yaml"
    problem = system_folder_problem(study_paths(spec, spec_path)["workdir"])
    if problem:
        given = "workdir" if spec.workdir else "workdir (the default, under base_dir)"
        raise SpecError(f"{label}: {given}: {problem}")
    return spec, spec_path, label


def launch(
    spec: Union[str, Path, Dict[str, Any], StudySpec],
    *,
    base_dir: Union[str, Path, None] = None,
    address: Optional[str] = None,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    out: Optional[TextIO] = None,
    status_interval: float = 30.0,
) -> LaunchSummary:
    """Run the study of ``spec`` (a spec file's path, a dict of its keys or a :class:`StudySpec`;
    see :func:`resolve_spec` for ``base_dir``) to its target (``--dry-run``: validate it and show
    one example trial per family, writing nothing); see :class:`Driver` for the phases."""
    import optuna

    from ._runner import check_resources, make_worker, start_ray

    out = out if out is not None else sys.stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, spec_path, label = resolve_spec(spec, base_dir=base_dir)  # every spec error, before any write
    paths = study_paths(spec, spec_path)
    url = resolve_storage_url(spec.storage, spec_dir=paths["spec_dir"], study_name=spec.name)
    _check_not_in_ray_package(url, paths["workdir"], spec.workdir)
    driver = Driver(spec, label, paths=paths, storage_label=redact(url), out=out,
                    status_interval=status_interval, make_worker=make_worker)
    if dry_run:
        driver.preview()
        return driver.summary

    # what the environment must offer is checked before the database is touched
    _check_workdir(paths["workdir"])
    cluster = address or spec.executor.address or os.environ.get("RAY_ADDRESS")
    where = start_ray(cluster, num_cpus=spec.executor.num_cpus)
    short = check_resources(spec.resources.cpus_per_trial, spec.resources.gpus_per_trial)
    if short and not cluster:
        raise ValueError(short)  # a local Ray never grows
    if short:  # a cluster may scale up (an autoscaler adds nodes for waiting trials)
        print(f"[{spec.name}] warning: {short} now; trials wait until it grows", file=out)

    # from here on a signal waits for the loop's first safe point (Ray's own SIGTERM handler,
    # installed by ray.init, would end the process)
    driver.interrupt.install()
    try:
        driver.open(url, resume=resume, force=force)
        # where the trials' structure files are (gsmsearch.apply_structure finds them from the study)
        with_retries(lambda: driver.study.set_user_attr("structures_dir", str(paths["structures"])))
        driver.recover()
        driver.trial_index().refresh()  # its one read of the whole study, before the loop
        print(f"[{spec.name}] storage {driver.summary.storage}; {where}; up to {spec.concurrency} concurrent "
              f"trial(s)", file=out)
        for key in ("checkpoints", "cache", "structures"):
            paths[key].mkdir(parents=True, exist_ok=True)
        driver.run()
        return driver.summarize()
    except DatabaseUnreachable as error:
        error.storage = redact(url)
        error.resume = resume_command(label)
        raise
    finally:
        driver.interrupt.restore()
        if driver.lock is not None:
            driver.lock.release()

