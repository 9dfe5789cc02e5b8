"""Ray side of a study: start/connect Ray, and the trial worker actors.

Workers are long-lived Ray actors (one per concurrent trial slot), so torch and the workload's
data are imported/loaded once per worker, not once per trial.  A worker returns the trial's result
as a plain dict to the driver; it never writes to the study database.

A workload given as ``path/to/file.py:ClassName`` reaches the workers as text: the driver read the
file when it validated the spec, and passes every such file to each worker it creates, which runs
that text (``workloads._plugins``: ``shipped_files`` / ``receive_files``).  No shared filesystem
and no runtime environment are needed for it.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Dict, Optional

__all__ = ["start_ray", "check_resources", "make_worker", "execute_trial", "TrialError", "describe_exception",
           "describe_failure"]


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
                  structure_path: Optional[str] = None) -> Dict[str, Any]:
    """Run one trial in this process.  Returns {"ok": True, "result": ...}, or
    {"ok": False, "reason": ..., "final": True} for a trial that can never succeed as configured
    (:class:`TrialFailed`, e.g. a diverging loss; ``BudgetTooSmall``, a budget below the
    family's cheapest layer) or whose result cannot be recorded (not JSON).  Any other exception
    is raised as a :class:`TrialError` carrying only its one-line description (type, message,
    ``file:line in function`` of the deepest frame in gsmsearch or the user's code), never the
    exception itself: an exception that does not pickle cannot reach the driver; the driver
    retries a trial that raised it (``retries``), then records it FAIL for good."""
    import json
    import time

    from ..trainer import TrialConfig, TrialFailed, run_trial

    started = time.time()
    try:
        result = run_trial(TrialConfig.from_dict(config), checkpoint_dir=checkpoint_dir,
                           cache_dir=cache_dir, structure_path=structure_path)
        result = result.to_dict()
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


def make_worker(cpus: float, gpus: float):
    """A new worker actor holding ``cpus`` CPUs and ``gpus`` (possibly fractional) GPUs."""
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
                hold_seconds=0.0):
            """Run one trial attempt (see :func:`execute_trial`).  A stop asked by :meth:`stop`
            ends it at its next epoch boundary: the outcome is then {"ok": False, "pruned":
            True, "epochs": the last epoch trained, "curve": its epochs, "reason": ...}.  After an
            epoch in ``hold_at`` (where the driver's pruner decides) the trial waits, up to
            ``hold_seconds``, for the driver's verdict on it (:meth:`proceed` or :meth:`stop`),
            so a trial stopped there trains no further epoch."""
            import time

            from ..trainer._trial import TrialStopped, epoch_watch

            with self._lock:
                self._token, self._epochs, self._seen, self._stop = token, [], [], None
                self._stopped_at = None
                self._hold, self._hold_seconds, self._released = set(hold_at or ()), float(hold_seconds), set()
                self._lock.notify_all()
            started = time.time()
            try:
                with epoch_watch(self._epoch_done):
                    outcome = execute_trial(config, checkpoint_dir, cache_dir, structure_path)
            except TrialStopped:
                outcome = {"ok": False}
            except TrialError:  # the stop, as execute_trial reports any exception; else a failure
                if self._stopped_at is None:
                    raise
                outcome = {"ok": False}
            finally:
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

    return TrialWorker.options(num_cpus=cpus, num_gpus=gpus).remote(max(1, int(cpus)), shipped_files())
