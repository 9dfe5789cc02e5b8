"""A one-node Slurm cluster on this machine, for the tests: ``munged``, ``slurmctld`` and
``slurmd`` (Debian's ``slurm-wlm`` and ``munge``, which scripts/test-services.sh installs), with
the munge key, ``slurm.conf``, state, spool, pid and log files in one temporary folder and the
daemons' ports chosen free.  Clients find it through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`).

The node is named ``localhost`` (jobs run on this machine; ``hostname`` inside a job is the
machine's own name).  It has ``cpus`` CPUs for Slurm to hand out (``SlurmdParameters=
config_overrides``: the configured count, whatever the machine has), no memory accounting, no
cgroups.  A daemon that does not start, or a node that does not come up idle, fails with the
daemon's log."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

NODE = "localhost"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    for folder in ("", "/usr/sbin/", "/usr/bin/"):
        found = shutil.which(name) if not folder else (folder + name if os.path.exists(folder + name) else None)
        if found:
            return found
    raise RuntimeError(f"{name!r} not found; scripts/test-services.sh installs slurm-wlm and munge")


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, cpus: int = 2) -> None:
        if os.geteuid() != 0:
            raise SlurmError("the one-node Slurm cluster runs its daemons as root")
        self.cpus = cpus
        # not under pytest's tmp dir: munged runs as the munge user and must reach its folder
        self.root = Path(tempfile.mkdtemp(prefix="gsm-slurm-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.pids: Dict[str, Path] = {}
        self.logs: Dict[str, Path] = {}

    # -- clients ---------------------------------------------------------------------------

    def env(self, **extra: str) -> Dict[str, str]:
        """The environment of a Slurm client (sbatch, squeue, scancel, ...) of this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env(**extra), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n{self.daemon_logs()}")
        return done

    def daemon_logs(self, tail: int = 3000) -> str:
        parts = []
        for name, log in self.logs.items():
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"--- {name} log ({log}):\n{text[-tail:]}")
        return "\n".join(parts)

    # -- daemons ---------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._start_slurm()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        self.munge_dir.mkdir()
        os.chmod(self.munge_dir, 0o755)  # munged: the socket's folder is searchable by all
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for path in (self.munge_dir, key):
            shutil.chown(path, "munge", "munge")
        self.pids["munged"] = self.munge_dir / "munged.pid"
        self.logs["munged"] = self.munge_dir / "munged.log"
        done = subprocess.run(
            ["runuser", "-u", "munge", "--", _binary("munged"), f"--key-file={key}", f"--socket={self.socket}",
             f"--pid-file={self.pids['munged']}", f"--log-file={self.logs['munged']}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SlurmError(f"munged did not start ({done.returncode}): {done.stderr.strip()}\n{self.daemon_logs()}")
        check = subprocess.run(f"{_binary('munge')} -n -S {self.socket} | {_binary('unmunge')} -S {self.socket}",
                               shell=True, capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise SlurmError(f"munge does not answer: {check.stderr.strip()}\n{self.daemon_logs()}")

    def _write_conf(self) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        self.logs["slurmctld"] = self.root / "log" / "slurmctld.log"
        self.logs["slurmd"] = self.root / "log" / "slurmd.log"
        self.pids["slurmctld"] = self.root / "slurmctld.pid"
        self.pids["slurmd"] = self.root / "slurmd.pid"
        lines = [
            "ClusterName=gsmtest",
            f"SlurmctldHost={NODE}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pids['slurmctld']}",
            f"SlurmdPidFile={self.pids['slurmd']}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            # a job's processes get KillWait seconds between SIGTERM and SIGKILL
            "KillWait=30",
            # the limits are enforced (and the --signal warnings sent) within seconds, not minutes
            "OverTimeLimit=0",
            "SchedulerParameters=sched_interval=2,sched_min_interval=100000",
            "MessageTimeout=30",
            "InactiveLimit=0",
            "MinJobAge=600",
            f"NodeName={NODE} CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_slurm(self) -> None:
        for daemon in ("slurmctld", "slurmd"):
            done = subprocess.run([_binary(daemon), "-f", str(self.conf)], env=self.env(),
                                  capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise SlurmError(f"{daemon} did not start ({done.returncode}): {done.stderr.strip()}\n"
                                 f"{self.daemon_logs()}")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = self.run("sinfo", "--noheader", "--nodes", NODE, "--format=%T", check=False)
            state = done.stdout.strip()
            if done.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise SlurmError(f"node {NODE} not idle after {timeout:g}s (sinfo: {state!r})\n{self.daemon_logs()}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons (by their pid files) and remove the folder."""
        if self.conf.exists():
            self.run("scancel", "--full", "--user=root", check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def _pid(self, name: str) -> Optional[int]:
        path = self.pids.get(name)
        try:
            return int(path.read_text().split()[0]) if path else None
        except (OSError, ValueError, IndexError):
            return None

    # -- jobs ------------------------------------------------------------------------------

    def sbatch(self, *argv: str, **extra: str) -> str:
        """Submit a batch job; its id."""
        done = self.run("sbatch", "--parsable", *argv, **extra)
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        done = self.run("scontrol", "--oneliner", "show", "job", job_id, check=False)
        fields: Dict[str, str] = {}
        for item in done.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, states: List[str], timeout: float, log: Optional[Path] = None) -> Dict[str, str]:
        """Wait until the job is in one of ``states``; its fields then."""
        deadline = time.monotonic() + timeout
        fields: Dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(0.5)
        output = log.read_text(errors="replace")[-4000:] if log and log.exists() else "(no output)"
        raise SlurmError(f"job {job_id} not {states} after {timeout:g}s: {fields.get('JobState')} "
                         f"({fields.get('Reason')})\n--- job output:\n{output}\n{self.daemon_logs()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
