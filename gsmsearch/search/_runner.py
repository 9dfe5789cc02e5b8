"""Ray side of a study: start/connect Ray, and the trial worker actors.

Workers are long-lived Ray actors (one per concurrent trial slot), so torch and the workload's
data are imported/loaded once per worker, not once per trial.  A worker returns the trial's result
as a plain dict to the driver; it never writes to the study database.

A workload given as ``path/to/file.py:ClassName`` reaches the workers as text: the driver read the
file when it validated the spec, and passes every such file to each worker it creates, which runs
that text (``workloads._plugins``: ``shipped_files`` / ``receive_files``).  No shared filesystem
and no runtime environment are needed for it.

A data-parallel trial (``resources.workers_per_trial`` N > 1) runs on a :class:`WorkerGroup`: N
worker actors in one Ray placement group (one bundle per worker, PACK or SPREAD), which the
driver holds, places, reuses and kills as it does one worker.  Rank 0 is the worker the driver
talks to: its ``run`` starts the other ranks (``run_rank``), trains as rank 0, reports the epochs
and returns the trial's one result (``trainer._distributed`` for the training).  A rank that
fails fails the attempt: rank 0 reports it (``rank R of N: reason``), or, where rank 0 is left
waiting on the dead rank, it ends its own process, which the driver sees as a dead worker; the
driver retries the trial on a new group from its last checkpoint, as for any failed attempt.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Dict, List, Optional

__all__ = ["start_ray", "check_resources", "make_worker", "execute_trial", "TrialError", "describe_exception",
           "describe_failure", "WorkerGroup", "kill_worker"]

#: seconds rank 0 waits, once another rank of its trial has failed, for its own attempt to end
#: (a collective fails at once where the dead rank's connection closes) before it ends its process
RANK_FAILURE_GRACE_SECONDS = 20.0


def start_ray(address: Optional[str], *, num_cpus: Optional[int] = None) -> str:
    """Connect to ``address`` (``"auto"``, ``"ray://..."``, ``host:port``) or start a local Ray
    bound to 127.0.0.1 only.  Returns a description for messages."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing Ray session"
    if address:
        _check_reachable(address)
        # a cluster on this machine's loopback (a test's): the driver joins it on 127.0.0.1 too
        joining = _loopback_only() if _is_loopback(address) else contextlib.nullcontext()
        with joining:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return f"Ray cluster at {address}"
    with _loopback_only():
        ray.init(
            # "local": a new instance even where a `ray start` cluster runs on this machine (with
            # no address Ray would join the one recorded in its temp folder)
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="ERROR",
            log_to_driver=False,
            configure_logging=True,
        )
    return f"local Ray ({num_cpus or os.cpu_count()} CPUs, 127.0.0.1)"


@contextlib.contextmanager
def _loopback_only():
    """A local, single-machine Ray with every server on 127.0.0.1 and no token between them.

    Ray binds its servers to all interfaces and replaces a loopback ``_node_ip_address`` by the
    machine's routable address unless clusters are disabled, and it reads that switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) once, when ``ray`` is first imported.  So the variable
    is set for the processes Ray starts now, and the value Ray already read is overridden for the
    time of ``ray.init``; both are put back afterwards, so a later connection to a real cluster
    from this process is not held to loopback.

    ``RAY_AUTH_MODE`` (unless set already) stays ``disabled`` for as long as the process lives: with
    it unset, Ray turns token authentication on in a process that finds a token in ``~/.ray``, at
    any later call and for every child process, which then cannot talk to this Ray."""
    from ray._private import ray_constants

    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def _is_loopback(address: str) -> bool:
    import ipaddress

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host = target.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A clear error at once for a ``host:port`` / ``ray://host:port`` nobody answers on (Ray
    itself retries such an address for minutes).  ``auto`` is left to Ray, which fails fast."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def check_resources(cpus: float, gpus: float) -> Optional[str]:
    """Why a trial asking for ``cpus`` CPUs and ``gpus`` GPUs cannot be placed on the Ray cluster
    as it is now (None when it can): such a trial waits until the cluster grows, forever on a
    fixed one."""
    import ray

    total = ray.cluster_resources()
    have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if cpus > have_cpus:
        return f"resources.cpus_per_trial: a trial asks for {cpus:g} CPUs, the Ray cluster has {have_cpus:g}"
    if gpus > have_gpus:
        return f"resources.gpus_per_trial: a trial asks for {gpus:g} GPUs, the Ray cluster has {have_gpus:g}"
    return None


class TrialError(RuntimeError):
    """An exception a trial raised, as the one line the driver records (``reason``: the
    exception's type and message, and where it was raised).  :func:`execute_trial` raises it in
    place of the trial's own exception, so what crosses Ray is always a plain error that the
    driver can read back, whatever the trial's exception holds."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Exceptions that say a configuration can never run as given: recorded FAIL for good at once,
#: never retried (every other exception a trial raises is retried, see :func:`execute_trial`).
def _final_errors():
    from ..structured._common import BudgetTooSmall
    from ..trainer import TrialFailed

    return (TrialFailed, BudgetTooSmall)


def execute_trial(config: Dict[str, Any], checkpoint_dir: str, cache_dir: str,
                  structure_path: Optional[str] = None, parallel=None) -> Dict[str, Any]:
    """Run one trial in this process.  Returns {"ok": True, "result": ...}, or
    {"ok": False, "reason": ..., "final": True} for a trial that can never succeed as configured
    (:class:`TrialFailed`, e.g. a diverging loss; ``BudgetTooSmall``, a budget below the
    family's cheapest layer) or whose result cannot be recorded (not JSON).  Any other exception
    is raised as a :class:`TrialError` carrying only its one-line description (type, message,
    ``file:line in function`` of the deepest frame in gsmsearch or the user's code), never the
    exception itself: an exception that does not pickle cannot reach the driver; the driver
    retries a trial that raised it (``retries``), then records it FAIL for good.

    ``parallel``: this process's rank in a data-parallel trial (``trainer._distributed``); a
    rank other than 0 returns {"ok": True, "result": None} when its training ends, or
    {"ok": False, "stopped": True} where rank 0 stopped the trial."""
    import json
    import time

    from ..trainer import TrialConfig, TrialFailed, run_trial
    from ..trainer._distributed import RankStopped

    started = time.time()
    try:
        result = run_trial(TrialConfig.from_dict(config), checkpoint_dir=checkpoint_dir,
                           cache_dir=cache_dir, structure_path=structure_path, parallel=parallel)
        result = result.to_dict() if result is not None else None
    except RankStopped:
        return {"ok": False, "stopped": True, "started": started, "finished": time.time()}
    except _final_errors() as failure:
        reason = failure.reason if isinstance(failure, TrialFailed) else describe_exception(failure)
        return {"ok": False, "reason": reason, "final": True, "started": started, "finished": time.time()}
    except Exception as error:  # noqa: BLE001 - whatever the trial raised, as a plain error
        raise TrialError(describe_exception(error)) from None
    try:
        json.dumps(result)
    except (TypeError, ValueError) as error:
        return {"ok": False, "reason": f"the trial's result cannot be recorded: {describe_exception(error)}",
                "final": True, "started": started, "finished": time.time()}
    return {"ok": True, "result": result, "started": started, "finished": time.time()}


def describe_exception(error: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message (at file:line in function)``: the deepest frame of the
    traceback in gsmsearch or in the user's code (not in the standard library or an installed
    package other than gsmsearch); the message alone when it already says where (a plugin
    workload's :class:`~gsmsearch.workloads.WorkloadCodeError`)."""
    import sysconfig
    import traceback

    from ..workloads import WorkloadCodeError

    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    described = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if isinstance(error, WorkloadCodeError):
        return described
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libraries = {os.path.abspath(p) for k, p in sysconfig.get_paths().items()
                 if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    frames = traceback.extract_tb(error.__traceback__)
    chosen = None
    for frame in frames:
        path = os.path.abspath(frame.filename)
        if path.startswith(package + os.sep) or not any(path.startswith(lib + os.sep) for lib in libraries):
            chosen = frame
    chosen = chosen or (frames[-1] if frames else None)
    if chosen is None:
        return described
    return f"{described} (at {chosen.filename}:{chosen.lineno} in {chosen.name})"


def describe_failure(error: BaseException) -> str:
    """Why a trial's Ray call failed, in one line, for the driver's record: the reason of a
    :class:`TrialError` the trial raised, "worker died: ..." for a lost worker process or node
    (killed, out of memory, node gone), else the error's type and last line (whatever Ray raised,
    e.g. an exception it could not deserialize)."""
    import ray

    cause = getattr(error, "cause", None) if isinstance(error, ray.exceptions.RayTaskError) else None
    if isinstance(cause, TrialError):
        return cause.reason
    if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                          ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
                          ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError)):
        return f"worker died: {type(error).__name__}"
    shown = cause if isinstance(cause, BaseException) else error
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[-1][:500] if lines else ''}".rstrip(": ")


def make_worker(cpus: float, gpus: float, *, workers: int = 1, placement: str = "pack"):
    """A new worker actor holding ``cpus`` CPUs and ``gpus`` (possibly fractional) GPUs; with
    ``workers`` > 1, a :class:`WorkerGroup` of that many actors sharing them evenly, in one
    placement group (``placement``: pack = on as few nodes as fit, spread = over as many)."""
    import ray

    from ..workloads._plugins import shipped_files

    # threads: one runs the trial; while it runs, others answer progress() (which waits for the
    # next epoch) and stop()
    @ray.remote(max_restarts=0, max_concurrency=4)
    class TrialWorker:
        def __init__(self, threads: int, workload_files=()) -> None:
            import threading

            import torch

            from ..workloads._plugins import receive_files

            torch.set_num_threads(max(1, threads))
            receive_files(list(workload_files))
            self.pid = os.getpid()
            self._lock = threading.Condition()  # notified at every epoch and at the end of a run
            self._token = None  # names the running trial attempt (given by the driver)
            self._ended = None  # the attempt that ended last
            self._epochs = []  # epochs reported since the last progress() call
            self._seen = []  # every epoch of the running attempt
            self._stop = None  # the stop reason asked for the running attempt
            self._stopped_at = None  # the epoch at which it stopped
            self._hold, self._hold_seconds, self._released = set(), 0.0, set()  # see run()

        def run(self, config, checkpoint_dir, cache_dir, structure_path=None, token=None, hold_at=(),
                hold_seconds=0.0, peers=(), backend="gloo"):
            """Run one trial attempt (see :func:`execute_trial`).  A stop asked by :meth:`stop`
            ends it at its next epoch boundary: the outcome is then {"ok": False, "pruned":
            True, "epochs": the last epoch trained, "curve": its epochs, "reason": ...}.  After an
            epoch in ``hold_at`` (where the driver's pruner decides) the trial waits, up to
            ``hold_seconds``, for the driver's verdict on it (:meth:`proceed` or :meth:`stop`),
            so a trial stopped there trains no further epoch.

            ``peers``: the other ranks' workers of a data-parallel trial (:class:`WorkerGroup`):
            this worker is rank 0; it starts them on the same trial and joins them over
            ``backend``; the outcome also lists each rank's parameter digests (``ranks``)."""
            import time

            from ..trainer._trial import TrialStopped, epoch_watch

            with self._lock:
                self._token, self._epochs, self._seen, self._stop = token, [], [], None
                self._stopped_at = None
                self._hold, self._hold_seconds, self._released = set(hold_at or ()), float(hold_seconds), set()
                self._lock.notify_all()
            started = time.time()
            group = _RankGroup(peers, backend, config, checkpoint_dir, cache_dir) if peers else None
            try:
                with epoch_watch(self._epoch_done):
                    outcome = execute_trial(config, checkpoint_dir, cache_dir, structure_path,
                                            parallel=group.lead if group is not None else None)
                if group is not None:
                    outcome["ranks"] = group.finish()
            except TrialStopped:
                outcome = {"ok": False}
            except TrialError as error:  # the stop, as execute_trial reports any exception; else a failure
                if self._stopped_at is None:
                    if group is not None:
                        group.raise_failure(error.reason)  # another rank's failure, where it caused this one
                    raise
                outcome = {"ok": False}
            finally:
                if group is not None:
                    group.close()
                with self._lock:
                    self._token, self._ended = None, token
                    self._lock.notify_all()
            if not outcome.get("ok") and self._stopped_at is not None:  # the stop, however reported
                outcome = {"ok": False, "pruned": True, "reason": self._stop, "epochs": self._stopped_at,
                           "curve": list(self._seen), "started": started, "finished": time.time()}
            context = ray.get_runtime_context()
            outcome.update(actor_id=context.get_actor_id(), node_id=context.get_node_id(),
                           host=socket.gethostname())
            return outcome

        def run_rank(self, config, checkpoint_dir, cache_dir, parallel):
            """Rank ``parallel["rank"]`` (> 0) of a data-parallel trial whose rank 0 called this
            (see :meth:`run`): trains its share; returns execute_trial's outcome with the
            parameter digest after each epoch (``digests``)."""
            from ..trainer._distributed import DataParallel

            rank = DataParallel(**parallel)
            outcome = execute_trial(config, checkpoint_dir, cache_dir, None, parallel=rank)
            outcome.update(rank=rank.rank, digests=list(rank.epoch_digests), pid=self.pid,
                           node=ray.get_runtime_context().get_node_id())
            return outcome

        def _epoch_done(self, report) -> None:
            from ..trainer._trial import TrialStopped

            epoch = int(report["epoch"])
            with self._lock:
                quality = (report.get("val") or {}).get("quality")
                item = {"epoch": epoch, "quality": None if quality is None else float(quality),
                        "relative_flops": report.get("relative_flops")}
                self._epochs.append(item)
                self._seen.append(item)
                self._lock.notify_all()
                if epoch in self._hold and self._hold_seconds > 0:
                    self._lock.wait_for(lambda: self._stop is not None or epoch in self._released,
                                        timeout=self._hold_seconds)
                stop = self._stop
                if stop is not None:
                    self._stopped_at = epoch
            if stop is not None:
                raise TrialStopped(stop, epoch)

        def progress(self, token, wait: float = 0.0):
            """The epochs attempt ``token`` finished since the last call, each {"epoch", "quality"
            (validation), "relative_flops"}, waiting up to ``wait`` seconds for one when there is
            none yet (also for the attempt to start: this call may run before its run() does);
            [] once the attempt has ended or another one runs."""
            def answer_now():
                if self._token == token:
                    return bool(self._epochs)
                return token == self._ended or self._token is not None

            with self._lock:
                if token is None:
                    return []
                if wait > 0:
                    self._lock.wait_for(answer_now, timeout=wait)
                if token != self._token:
                    return []
                epochs, self._epochs = self._epochs, []
                return epochs

        def stop(self, token, reason: str) -> bool:
            """Ask the attempt ``token`` to stop at its next epoch boundary; False when another
            attempt (or none) is running, which is left alone."""
            with self._lock:
                if token is None or token != self._token:
                    return False
                self._stop = str(reason)
                self._lock.notify_all()
                return True

        def proceed(self, token, epoch: int) -> None:
            """The driver's verdict on epoch ``epoch`` of attempt ``token``: it continues."""
            with self._lock:
                if token is not None and token == self._token:
                    self._released.add(int(epoch))
                    self._lock.notify_all()

        def info(self):
            """Where this worker runs; answered once it is placed (the driver waits on it)."""
            return {"pid": self.pid, "node": ray.get_runtime_context().get_node_id(),
                    "host": socket.gethostname()}

    if int(workers) <= 1:
        return TrialWorker.options(num_cpus=cpus, num_gpus=gpus).remote(max(1, int(cpus)), shipped_files())
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = int(workers)
    each_cpus, each_gpus = float(cpus) / n, float(gpus) / n
    bundle = {"CPU": each_cpus, **({"GPU": each_gpus} if each_gpus > 0 else {})}
    group = placement_group([dict(bundle) for _ in range(n)], strategy=str(placement).upper())
    ranks = [
        TrialWorker.options(num_cpus=each_cpus, num_gpus=each_gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index)).remote(max(1, int(each_cpus)), shipped_files())
        for index in range(n)
    ]
    # nccl where every rank holds a GPU of its own; gloo on CPUs and for ranks sharing a GPU
    return WorkerGroup(ranks, group, backend="nccl" if each_gpus >= 1 else "gloo")


class WorkerGroup:
    """The workers of one data-parallel trial, seen by the driver as one worker: ``run``,
    ``info``, ``progress``, ``stop`` and ``proceed`` go to rank 0 (``run`` with the other ranks
    as its peers), :func:`kill_worker` ends every rank and frees the placement group.  Rank 0 is
    placed only once the whole placement group is reserved, so its ``info`` answering means the
    trial holds all its resources."""

    def __init__(self, ranks, placement_group, backend: str) -> None:
        self.ranks, self.placement_group, self.backend = list(ranks), placement_group, backend
        lead = self.ranks[0]
        self.info, self.progress, self.stop, self.proceed = lead.info, lead.progress, lead.stop, lead.proceed
        self.run = _GroupMethod(lead, self.ranks[1:], backend)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            try:
                ray.kill(rank)
            except Exception:  # noqa: BLE001 - already dead
                pass
        try:
            remove_placement_group(self.placement_group)
        except Exception:  # noqa: BLE001 - already removed
            pass


class _GroupMethod:
    def __init__(self, lead, peers, backend: str) -> None:
        self.lead, self.peers, self.backend = lead, list(peers), backend

    def remote(self, *args, **kwargs):
        return self.lead.run.remote(*args, peers=self.peers, backend=self.backend, **kwargs)


def kill_worker(worker) -> None:
    """End a worker actor, or every rank of a :class:`WorkerGroup` (and free its placement group)."""
    import ray

    if isinstance(worker, WorkerGroup):
        worker.kill()
        return
    try:
        ray.kill(worker)
    except Exception:  # noqa: BLE001 - already dead
        pass


class _RankGroup:
    """Rank 0's side of a data-parallel attempt (in :meth:`TrialWorker.run`): it starts the other
    ranks on a rendezvous address of this node, watches them and collects their outcomes."""

    def __init__(self, peers, backend, config, checkpoint_dir, cache_dir) -> None:
        import threading

        import ray

        from ..trainer._distributed import DataParallel

        address = ray.util.get_node_ip_address()
        world = len(peers) + 1
        port = _free_port(address)
        self.lead = DataParallel(rank=0, world_size=world, master_addr=address, master_port=port, backend=backend)
        self.refs = [peer.run_rank.remote(config, checkpoint_dir, cache_dir,
                                          DataParallel(rank=index + 1, world_size=world, master_addr=address,
                                                       master_port=port, backend=backend).to_dict())
                     for index, peer in enumerate(peers)]
        self.failed: Optional[str] = None
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._watch_ranks, daemon=True)
        self._watch.start()

    def _failure(self, index: int, error: BaseException) -> str:
        return f"rank {index + 1} of {len(self.refs) + 1}: {describe_failure(error)}"

    def _watch_ranks(self) -> None:
        """Notes the first rank that fails; where rank 0's attempt has not ended
        :data:`RANK_FAILURE_GRACE_SECONDS` later (it waits on the dead rank), ends this process."""
        import ray

        pending = list(self.refs)
        while pending and not self._done.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as error:  # noqa: BLE001 - a failed rank
                    self.failed = self.failed or self._failure(self.refs.index(ref), error)
            if self.failed is not None:
                if not self._done.wait(RANK_FAILURE_GRACE_SECONDS):
                    os._exit(1)  # the driver sees a dead worker and retries the trial
                return

    def finish(self) -> List[Dict[str, Any]]:
        """Every other rank's outcome (rank, digests, ...) once rank 0's attempt has ended;
        raises :class:`TrialError` for a rank that failed."""
        import ray

        outcomes = []
        for index, ref in enumerate(self.refs):
            try:
                outcome = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - the attempt fails with it
                raise TrialError(self._failure(index, error)) from None
            outcomes.append({k: outcome.get(k) for k in ("rank", "digests", "pid", "node")})
        return [{"rank": 0, "digests": list(self.lead.epoch_digests), "pid": os.getpid()}] + outcomes

    def raise_failure(self, own: str) -> None:
        """Rank 0's attempt failed with ``own``: raise instead another rank's failure (a
        :class:`TrialError` naming the rank), seen within a few seconds, where it is the cause:
        that rank's process died, or rank 0's own error is a failed collective (the other rank
        left the process group by failing).  Otherwise rank 0's error stands: another rank's
        exception may then be its consequence."""
        import ray

        collective = any(word in own for word in ("Connection closed", "Connection reset", "gloo", "NCCL",
                                                  "DistBackendError", "DistNetworkError"))
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=5.0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as error:  # noqa: BLE001 - the cause, where the process died
                if collective or describe_failure(error).startswith("worker died"):
                    raise TrialError(self._failure(self.refs.index(ref), error)) from None

    def close(self, wait: float = 30.0) -> None:
        """Rank 0's attempt has ended: wait (up to ``wait`` seconds) for the other ranks' calls
        to end too, so that the group's next trial starts on workers that have left this one's
        process group."""
        import ray

        self._done.set()
        if self.refs:
            ray.wait(list(self.refs), num_returns=len(self.refs), timeout=wait)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]
