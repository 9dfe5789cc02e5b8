"""Ray side of a study: start/connect Ray, and the trial worker actors.

Workers are long-lived Ray actors (one per concurrent trial slot), so torch and the workload's
data are imported/loaded once per worker, not once per trial.  A worker returns the trial's result
as a plain dict to the driver; it never writes to the study database.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

__all__ = ["start_ray", "make_worker", "execute_trial"]


def start_ray(address: Optional[str], *, num_cpus: Optional[int] = None) -> str:
    """Connect to ``address`` (``"auto"``, ``"ray://..."``, ``host:port``) or start a local Ray
    bound to 127.0.0.1 only.  Returns a description for messages."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing Ray session"
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return f"Ray cluster at {address}"
    # A local, single-machine Ray: every server on loopback, no token needed between them.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
        configure_logging=True,
    )
    return f"local Ray ({num_cpus or os.cpu_count()} CPUs, 127.0.0.1)"


def execute_trial(config: Dict[str, Any], checkpoint_dir: str, cache_dir: str,
                  structure_path: Optional[str] = None) -> Dict[str, Any]:
    """Run one trial in this process.  Returns {"ok": True, "result": ...} or
    {"ok": False, "reason": ..., "final": True} for a trial that can never succeed as configured
    (e.g. a diverging loss).  Other exceptions propagate (the driver retries those)."""
    import time

    from ..trainer import TrialConfig, TrialFailed, run_trial

    started = time.time()
    try:
        result = run_trial(TrialConfig.from_dict(config), checkpoint_dir=checkpoint_dir,
                           cache_dir=cache_dir, structure_path=structure_path)
    except TrialFailed as failure:
        return {"ok": False, "reason": failure.reason, "final": True,
                "started": started, "finished": time.time()}
    return {"ok": True, "result": result.to_dict(), "started": started, "finished": time.time()}


def make_worker(cpus: float, gpus: float):
    """A new worker actor holding ``cpus`` CPUs and ``gpus`` (possibly fractional) GPUs."""
    import ray

    @ray.remote(max_restarts=0, max_concurrency=1)
    class TrialWorker:
        def __init__(self, threads: int) -> None:
            import torch

            torch.set_num_threads(max(1, threads))
            self.pid = os.getpid()

        def run(self, config, checkpoint_dir, cache_dir, structure_path=None):
            outcome = execute_trial(config, checkpoint_dir, cache_dir, structure_path)
            outcome["actor_id"] = ray.get_runtime_context().get_actor_id()
            return outcome

        def info(self):
            return {"pid": self.pid, "node": ray.get_runtime_context().get_node_id()}

    return TrialWorker.options(num_cpus=cpus, num_gpus=gpus).remote(max(1, int(cpus)))
