"""`gsmsearch launch`: the driver of a study.

The driver is the only process that writes to the study database.  It asks Optuna for trials
(ask/tell), runs them on Ray worker actors, and tells Optuna the results.  What survives what:

- a trial that fails (exception, worker crash, time limit) is retried up to ``retries`` times
  from its last per-epoch checkpoint; after that it is recorded FAIL with its reason;
- a killed driver leaves RUNNING trials behind: the next ``launch --resume`` marks them FAIL
  ("stale") and re-enqueues their configurations, which resume from their checkpoints;
- Ctrl-C stops the running trials, records them FAIL ("interrupted") and exits; ``--resume``
  continues the same way;
- transient database errors (a restarted PostgreSQL, a locked SQLite) are retried.
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
from typing import Any, Dict, List, Optional, TextIO

from ._spec import SpecError, StudySpec, load_spec
from ._storage import fail_stale_trials, open_storage, redact, resolve_storage_url, with_retries
from ._space import space_size
from ._study import front_records, study_hypervolume, study_records

__all__ = ["launch", "LaunchSummary", "make_sampler", "study_paths"]

DRIVER_STALE_SECONDS = 60.0
DUPLICATES_IN_A_ROW = 8  # a family whose sampler repeats finished configurations this often is exhausted
RESULT_SCALARS = (
    "quality", "val_quality", "flops_per_sample", "dense_flops_per_sample", "relative_flops",
    "relative_linear_flops", "structured_relative_flops", "params", "dense_params", "latency_ms",
    "dense_latency_ms", "train_seconds", "epochs_run",
)


@dataclass
class LaunchSummary:
    study_name: str
    storage: str  # redacted
    completed: int = 0
    failed: int = 0
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

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def status(self, study, spec: StudySpec, running: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        records = study_records(study)
        done = sum(1 for r in records if _counts_as_done(r))
        failed = sum(1 for r in records if r.state == "FAIL" and r.user_attrs.get("final", True))
        front = front_records(records, spec.directions)
        hv = study_hypervolume(records, spec.metric_names, spec.directions)
        remaining = max(0, self.total - done)
        eta = ""
        if self.durations and remaining:
            per = sum(self.durations) / len(self.durations)
            seconds = per * remaining / max(1, spec.concurrency)
            eta = f", ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"
        hv_text = "" if hv != hv else f", hypervolume {hv:.4f}"
        self.line(f"[{spec.name}] {done}/{self.total} done, {running} running, {failed} failed; "
                  f"front {len(front)}{hv_text}{eta}")


def _counts_as_done(record) -> bool:
    return record.state == "COMPLETE" or (record.state == "FAIL" and record.user_attrs.get("final", True))


@dataclass
class _Running:
    trial: Any
    config: Dict[str, Any]
    worker: Any
    ref: Any
    attempt: int
    started: float  # monotonic, for the time limit
    submitted: float  # wall clock


def _driver_alive(driver: Dict[str, Any]) -> bool:
    """Whether the driver recorded on the study may still be running: its heartbeat is recent
    and, when it ran on this host, its process still exists."""
    if time.time() - float(driver.get("heartbeat", 0)) >= DRIVER_STALE_SECONDS:
        return False
    if driver.get("host") == socket.gethostname():
        try:
            os.kill(int(driver["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, KeyError):
            return True
    return True


class _DeferredInterrupt:
    """Ctrl-C while the driver runs is noted and raised as KeyboardInterrupt at the loop's next
    safe point (:meth:`check`, at the top of the loop), never between asking Optuna for a trial
    and submitting it, nor while a finished trial's result is being recorded (a result that has
    arrived is kept); a second Ctrl-C interrupts at once.  Only
    in the main thread (signal handlers live there); elsewhere Ctrl-C behaves as usual."""

    def __init__(self) -> None:
        self.pending = False
        self._previous = None

    def install(self) -> "_DeferredInterrupt":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
        has_trials = bool(study.get_trials(deepcopy=False))
        if has_trials and not (resume or force):
            raise SpecError(
                f"study {spec.name!r} already has {len(study.get_trials(deepcopy=False))} trials; "
                f"pass --resume to continue it"
            )
        driver = study.user_attrs.get("driver")
        if driver and not force and _driver_alive(driver):
            raise SpecError(
                f"another driver is running study {spec.name!r} (pid {driver.get('pid')} on "
                f"{driver.get('host')}, seen {time.time() - float(driver['heartbeat']):.0f}s ago); "
                f"wait for it or pass --force"
            )
    else:
        study = with_retries(lambda: optuna.create_study(
            study_name=spec.name, storage=storage, directions=spec.directions, sampler=sampler,
            load_if_exists=True))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            with_retries(lambda: study.set_metric_names(spec.metric_names))
    with_retries(lambda: study.set_user_attr("spec", spec.canonical()))
    with_retries(lambda: study.set_user_attr("spec_hash", spec.digest()))
    from .. import __version__

    with_retries(lambda: study.set_user_attr("gsmsearch_version", __version__))
    return study


def _requeue_unfinished(study) -> int:
    """Enqueue again the configurations of trials that stopped without a verdict (stale or
    interrupted) and that no COMPLETE trial has run since; returns how many.  A re-enqueued trial
    carries ``requeued_from`` (finished trials cannot be updated, so the mark is on the new one)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    completed = {t.user_attrs.get("config_digest") for t in trials if t.state == TrialState.COMPLETE}
    requeued = {t.user_attrs.get("requeued_from") for t in trials}
    count = 0
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.user_attrs.get("final", True):
            continue
        if trial.number in requeued or trial.user_attrs.get("config_digest") in completed:
            continue
        if not trial.params:
            continue
        with_retries(lambda: study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number},
                                                 skip_if_exists=False))
        count += 1
    return count


def _known_digests(trials) -> Dict[str, int]:
    """config digest -> trial number, for COMPLETE trials and those running now (``trials``: the
    study's trials, read once by the caller)."""
    known = {}
    for t in trials:
        digest = t.user_attrs.get("config_digest")
        if digest and (t.state.name == "COMPLETE" or t.state.name == "RUNNING"):
            known[digest] = t.number
    return known


def _next_trial(study, spec: StudySpec, exhausted: Dict[str, int], trials):
    """Ask for the next trial: a re-enqueued configuration first, else the least-tried family
    among those whose space is not exhausted (``exhausted``: family -> duplicates in a row;
    ``trials``: the study's trials, read once by the caller)."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.WAITING for t in trials):
        counts = {family: 0 for family in spec.families if exhausted.get(family, 0) < DUPLICATES_IN_A_ROW}
        if not counts:
            return None
        for t in trials:
            family = t.params.get("family")
            if family in counts and t.state in (TrialState.COMPLETE, TrialState.RUNNING) or (
                    family in counts and t.state == TrialState.FAIL and t.user_attrs.get("final", True)):
                counts[family] += 1
        # a family whose finite space has been run entirely gets no more proposals
        counts = {f: c for f, c in counts.items() if (space_size(spec, f) or float("inf")) > c}
        if not counts:
            return None
        family = min(counts, key=lambda f: (counts[f], list(spec.families).index(f)))
        with_retries(lambda: study.enqueue_trial({"family": family}, skip_if_exists=False))
    return with_retries(study.ask)


def launch(
    spec_path,
    *,
    address: Optional[str] = None,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    out: Optional[TextIO] = None,
    status_interval: float = 30.0,
) -> LaunchSummary:
    import optuna

    from ..trainer import TrialConfig
    from ._runner import check_resources, make_worker, start_ray
    from ._space import family_configurations, trial_config

    out = out if out is not None else sys.stderr
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(spec_path)  # every spec error is raised here, before any write
    paths = study_paths(spec, Path(spec_path))
    url = resolve_storage_url(spec.storage, spec_dir=paths["spec_dir"], study_name=spec.name)
    summary = LaunchSummary(study_name=spec.name, storage=redact(url))
    device = "cuda" if spec.resources.gpus_per_trial > 0 else "cpu"

    if dry_run:
        preview = optuna.create_study(directions=spec.directions, sampler=make_sampler(spec))
        print(f"spec {spec_path}: valid (hash {spec.digest()[:12]})", file=out)
        print(f"storage: {summary.storage}\nworkdir: {paths['workdir']}", file=out)
        for family in list(spec.families)[: min(len(spec.families), spec.trials)]:
            preview.enqueue_trial({"family": family})
            config = trial_config(spec, preview.ask(), device=device)
            print(f"example trial: {json.dumps(config.to_dict(), sort_keys=True)}", file=out)
        return summary

    # what the environment must offer is checked before the database is touched
    _check_workdir(paths["workdir"])
    cluster = address or spec.executor.address or os.environ.get("RAY_ADDRESS")
    where = start_ray(cluster, num_cpus=spec.executor.num_cpus)
    short = check_resources(spec.resources.cpus_per_trial, spec.resources.gpus_per_trial)
    if short and not cluster:
        raise ValueError(short)  # a local Ray never grows
    if short:  # a cluster may scale up (an autoscaler adds nodes for waiting trials)
        print(f"[{spec.name}] warning: {short} now; trials wait until it grows", file=out)
    storage = open_storage(url)
    study = _open_study(spec, storage, resume=resume, force=force)
    stale = fail_stale_trials(study, reason="stale: its driver stopped before the trial finished")
    requeued = _requeue_unfinished(study)
    if stale or requeued:
        print(f"[{spec.name}] marked {len(stale)} stale RUNNING trial(s) FAIL; re-enqueued "
              f"{requeued} unfinished configuration(s)", file=out)
    print(f"[{spec.name}] storage {summary.storage}; {where}; up to {spec.concurrency} concurrent "
          f"trial(s)", file=out)
    for key in ("checkpoints", "cache", "structures"):
        paths[key].mkdir(parents=True, exist_ok=True)

    display = _Display(out, spec.trials, status_interval)
    running: Dict[Any, _Running] = {}
    idle: List[Any] = []
    driver_id = {"pid": os.getpid(), "host": socket.gethostname()}
    last_heartbeat = 0.0

    def heartbeat(clear: bool = False) -> None:
        nonlocal last_heartbeat
        if clear:
            with_retries(lambda: study.set_user_attr("driver", None))
            return
        if time.monotonic() - last_heartbeat > DRIVER_STALE_SECONDS / 4:
            with_retries(lambda: study.set_user_attr("driver", {**driver_id, "heartbeat": time.time()}))
            last_heartbeat = time.monotonic()

    def done_count(trials=None) -> int:
        trials = study.get_trials(deepcopy=False) if trials is None else trials
        return sum(1 for t in trials
                   if t.state.name == "COMPLETE" or (t.state.name == "FAIL" and t.user_attrs.get("final", True)))

    def submit(trial, config: Dict[str, Any], attempt: int) -> None:
        worker = idle.pop() if idle else make_worker(spec.resources.cpus_per_trial, spec.resources.gpus_per_trial)
        digest = config["_digest"]
        ref = worker.run.remote(
            {k: v for k, v in config.items() if k != "_digest"},
            str(paths["checkpoints"] / digest), str(paths["cache"]),
            str(paths["structures"] / f"trial-{trial.number}.safetensors"),
        )
        running[ref] = _Running(trial, config, worker, ref, attempt, time.monotonic(), time.time())

    def fail_trial(trial, family: str, reason: str, *, final: bool) -> None:
        with_retries(lambda: trial.set_user_attr("failure_reason", reason[:2000]))
        with_retries(lambda: trial.set_user_attr("final", final))
        with_retries(lambda: study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True))
        display.line(f"[{spec.name}] trial {trial.number} ({family}) FAILED: {reason}")

    def record_failure(entry: _Running, reason: str, *, final: bool) -> None:
        fail_trial(entry.trial, entry.config["family"], reason, final=final)

    def record_orchestration(entry: _Running, outcome: Dict[str, Any], received: float) -> Dict[str, float]:
        timing = {
            "submit_to_start_s": outcome["started"] - entry.submitted,
            "run_s": outcome["finished"] - outcome["started"],
            "return_s": received - outcome["finished"],
        }
        with_retries(lambda: entry.trial.set_user_attr("timing", timing))
        with_retries(lambda: entry.trial.set_user_attr("ray_actor_id", outcome.get("actor_id")))
        with_retries(lambda: entry.trial.set_user_attr("attempts", entry.attempt + 1))
        return timing

    def record_result(entry: _Running, result: Dict[str, Any]) -> None:
        trial = entry.trial
        values = []
        for metric in spec.metric_names:
            value = result.get(metric)
            if value is None or value != value:
                record_failure(entry, f"metric {metric!r} missing from the trial's result", final=True)
                return
            values.append(float(value))
        for constraint in spec.constraints:
            value = float(result[constraint.metric])
            violation = value - constraint.max if constraint.max is not None else constraint.min - value
            trial.set_constraint(constraint.metric, violation)
        attrs = {k: result[k] for k in RESULT_SCALARS if k in result}
        attrs["test_metrics"] = result.get("test_metrics", {})
        attrs["resolved"] = result.get("resolved", {})  # what the config's defaults meant
        with_retries(lambda: trial.set_user_attr("result", attrs))
        with_retries(lambda: trial.set_user_attr("layers", result.get("layers", {})))
        with_retries(lambda: trial.set_user_attr("curves", result.get("curves", [])))
        with_retries(lambda: study.tell(trial, values, skip_if_finished=True))
        display.durations.append(time.monotonic() - entry.started)
        shown = ", ".join(f"{m} {v:.4g}" for m, v in zip(spec.metric_names, values))
        display.line(f"[{spec.name}] trial {trial.number} ({entry.config['family']}) done: {shown}")

    def retry_or_fail(entry: _Running, reason: str) -> None:
        import ray

        try:
            ray.kill(entry.worker)
        except Exception:  # noqa: BLE001 - already dead
            pass
        if entry.attempt < spec.retries:
            display.line(f"[{spec.name}] trial {entry.trial.number} attempt {entry.attempt + 1} failed "
                         f"({reason}); retrying from its last checkpoint")
            submit(entry.trial, entry.config, entry.attempt + 1)
        else:
            record_failure(entry, f"{reason} (after {entry.attempt + 1} attempt(s))", final=True)

    import ray

    exhausted: Dict[str, int] = {}
    asked: Dict[int, Any] = {}  # trial number -> every trial this launch asked for
    finite: Dict[str, Any] = {}  # family -> its configurations, where the space is finite
    exhausted_reported = False
    interrupt = _DeferredInterrupt().install()
    try:
        heartbeat()
        launched_target = spec.trials
        def fill(unrecorded: int) -> None:
            """Start trials until every slot is busy or the target is reached; ``unrecorded``
            results have arrived but are not in the database yet (they count as done)."""
            nonlocal launched_target, exhausted_reported
            in_flight = len(running)
            while in_flight < spec.concurrency:
                if interrupt.pending:  # stop asking; the loop stops once this result is recorded
                    break
                # one read of the study per proposal: the count, the family choice and the
                # duplicate check all see the same trials (none of them changes what they read)
                trials = with_retries(lambda: study.get_trials(deepcopy=False))
                if done_count(trials) + unrecorded + in_flight >= launched_target:
                    break
                trial = _next_trial(study, spec, exhausted, trials)
                if trial is not None:
                    asked[trial.number] = trial
                if trial is None:
                    if not exhausted_reported:
                        display.line(f"[{spec.name}] every family's search space is exhausted "
                                     f"(the samplers only propose configurations already run)")
                        exhausted_reported = True
                    launched_target = done_count() + unrecorded + in_flight
                    break
                config = trial_config(spec, trial, device=device).to_dict()
                digest = TrialConfig.from_dict(config).digest()
                known = _known_digests(trials)
                if digest in known:
                    # never run a configuration twice: record the proposal as pruned and ask again
                    family = config["family"]
                    with_retries(lambda: trial.set_user_attr("duplicate_of", known[digest]))
                    with_retries(lambda: trial.set_user_attr("family", family))
                    with_retries(lambda: study.tell(trial, state=optuna.trial.TrialState.PRUNED,
                                                    skip_if_finished=True))
                    # a finite space: hand the sampler's turn to a configuration not run yet
                    # (asking again is a coupon collector, and 8 repeats in a row would call
                    # the family exhausted with configurations left)
                    if family not in finite:
                        finite[family] = family_configurations(spec, family, device=device)
                    if finite[family] is None:
                        exhausted[family] = exhausted.get(family, 0) + 1
                    else:
                        unseen = [params for params, d in finite[family] if d not in known]
                        if unseen:
                            choice = random.Random(f"{spec.name}/{trial.number}").choice(unseen)
                            with_retries(lambda: study.enqueue_trial(choice, skip_if_exists=False))
                        else:
                            exhausted[family] = DUPLICATES_IN_A_ROW
                    continue
                exhausted[config["family"]] = 0
                with_retries(lambda: trial.set_user_attr("config", config))
                with_retries(lambda: trial.set_user_attr("config_digest", digest))
                with_retries(lambda: trial.set_user_attr("family", config["family"]))
                submit(trial, {**config, "_digest": digest}, attempt=0)
                in_flight += 1

        while True:
            interrupt.check()
            heartbeat()
            fill(0)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                entry = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
                    retry_or_fail(entry, f"worker died: {type(error).__name__}")
                    continue
                except ray.exceptions.RayTaskError as error:
                    cause = error.cause if getattr(error, "cause", None) is not None else error
                    retry_or_fail(entry, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500]}")
                    continue
                idle.append(entry.worker)
                received = time.time()
                # keep the worker busy: start the next trial first, then write this result
                fill(1)
                timing = record_orchestration(entry, outcome, received)
                if outcome["ok"]:
                    record_result(entry, outcome["result"])
                else:
                    record_failure(entry, outcome["reason"], final=True)
                timing["record_s"] = time.time() - received
                summary.timings.append({**timing, "started": outcome["started"],
                                        "finished": outcome["finished"],
                                        "worker": outcome.get("actor_id")})
            if spec.trial_timeout is not None:
                now = time.monotonic()
                for ref, entry in list(running.items()):
                    if now - entry.started > spec.trial_timeout:
                        running.pop(ref)
                        retry_or_fail(entry, f"exceeded trial_timeout of {spec.trial_timeout:g}s")
            display.status(study, spec, len(running))
    except KeyboardInterrupt:
        summary.interrupted = True
        reason = "interrupted (Ctrl-C); `launch --resume` runs it again from its checkpoint"
        for entry in running.values():
            try:
                ray.kill(entry.worker)
            except Exception:  # noqa: BLE001
                pass
            record_failure(entry, reason, final=False)
        # a trial this driver asked for that is in no slot (Ctrl-C between the ask and the
        # submission, or while a dead worker's trial was being resubmitted) is still RUNNING
        # in the database: it is interrupted too, not left for the stale check of a later launch
        from optuna.trial import TrialState

        for number in sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
                             & set(asked)):
            fail_trial(asked[number], asked[number].params.get("family", "?"), reason, final=False)
        print(f"[{spec.name}] stopped; continue with: gsmsearch launch {spec_path} --resume", file=out)
    finally:
        interrupt.restore()
        try:
            heartbeat(clear=True)
        except Exception:  # noqa: BLE001 - the database may be the thing that failed
            pass
        for worker in idle:
            try:
                ray.kill(worker)
            except Exception:  # noqa: BLE001
                pass

    records = study_records(study)
    summary.completed = sum(1 for r in records if r.state == "COMPLETE")
    summary.failed = sum(1 for r in records if r.state == "FAIL" and r.user_attrs.get("final", True))
    summary.front = [
        {"number": r.number, "family": r.family, **dict(zip(spec.metric_names, r.values))}
        for r in front_records(records, spec.directions)
    ]
    display.status(study, spec, 0, force=True)
    return summary
