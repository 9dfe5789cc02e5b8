"""A multi-node Ray cluster on this machine's loopback, for the tests: a head (no CPUs, so that
trials run on the worker nodes) and ``--nodes`` nodes of ``--cpus`` CPUs each, every server on
127.0.0.1 (``ray.cluster_utils.Cluster``: a second ``ray start --address`` on one host is refused
while clusters are off, and with them on Ray leaves loopback).  With ``--dashboard`` the head
runs Ray's dashboard, whose job server takes ``ray job submit``, on a free port of 127.0.0.1.

Run as ``python -m tests.search.ray_cluster --nodes 2``.  It prints one ``CLUSTER <json>`` line
(``address``; ``dashboard``: the job server's URL or null; ``nodes``: ``node_id`` and
``raylet_pid`` of each worker node), then reads commands on stdin: ``kill <node_id>`` SIGKILLs
that node's raylet and every process it started (its workers and agents: a machine that dies
takes them all; a worker whose raylet alone died may still finish its task), and the end of
input shuts the cluster down.  :func:`start` does this from a test (a context manager giving the
parsed line and ``process``), with Ray's files in a temporary folder of the cluster's own: Ray
Jobs find "their" cluster through the ``ray_current_cluster`` file of that folder, which
``/tmp/ray`` holds for whichever cluster of the machine started last."""
import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a dead node is noticed in about 3 s, not Ray's default 30 s
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                      "health_check_initial_delay_ms": 1000}


def _free_fixed_port() -> int:
    """A free port of 127.0.0.1 below the kernel's ephemeral range, so that none of the ports the
    cluster's processes bind dynamically (port 0) takes it before the server that is given it."""
    import random

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randint(20000, ephemeral_low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 20000 and {ephemeral_low - 1}")


@contextlib.contextmanager
def start(nodes: int = 2, cpus: int = 1, dashboard: bool = False):
    """The cluster, in a process of its own session (so nothing of it outlives the test): yields
    the ``CLUSTER`` line's dict plus ``process`` (write ``kill <node_id>`` to its stdin)."""
    # the environment's `gsmsearch` on the PATH of the cluster's processes, as a user's Ray has it
    # (a Ray Jobs entrypoint runs from the head's raylet)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # short: Ray's socket paths under it must stay within the 107 bytes Unix allows
    temp = tempfile.mkdtemp(prefix="gsm-rc-", dir="/tmp")
    command = [sys.executable, "-m", "tests.search.ray_cluster", "--nodes", str(nodes), "--cpus", str(cpus),
               "--temp-dir", temp]
    process = subprocess.Popen(command + (["--dashboard"] if dashboard else []), cwd=ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    try:
        line = process.stdout.readline()
        while line and not line.startswith("CLUSTER "):
            line = process.stdout.readline()
        assert line, "the test cluster did not start"
        cluster = json.loads(line[len("CLUSTER "):])
        cluster["process"] = process
        yield cluster
    finally:
        try:
            process.stdin.close()
            process.wait(60)
        except Exception:  # noqa: BLE001
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the cluster's processes only
        shutil.rmtree(temp, ignore_errors=True)


def _descendants(pid: int):
    """The processes ``pid`` started, and theirs (read from /proc)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def main() -> None:
    # before Ray is imported: it reads the switch once, at import
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"

    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--dashboard", action="store_true")
    parser.add_argument("--temp-dir", default=None)
    args = parser.parse_args()
    head = {"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS, "temp_dir": args.temp_dir}
    dashboard = None
    if args.dashboard:
        # the job server's port, free; the head's agent binds a port of the system's choosing
        # (None; Ray's default, 52365, is shared by every Ray on this machine), as the nodes' do
        port = _free_fixed_port()
        head.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                    dashboard_agent_listen_port=None)
        dashboard = f"http://127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args=head)
    if args.temp_dir:  # where the job server's drivers look for the cluster's address ("auto")
        from ray._private.utils import write_ray_address

        write_ray_address(cluster.address, args.temp_dir)
    nodes = [cluster.add_node(num_cpus=args.cpus, node_ip_address="127.0.0.1") for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    described = [{"node_id": node.node_id,
                  "raylet_pid": node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid}
                 for node in nodes]
    print("CLUSTER " + json.dumps({"address": cluster.address, "dashboard": dashboard, "nodes": described}),
          flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["kill"]:
                (pid,) = [n["raylet_pid"] for n in described if n["node_id"] == command[1]]
                for victim in [pid] + _descendants(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                print(f"KILLED {command[1]}", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
