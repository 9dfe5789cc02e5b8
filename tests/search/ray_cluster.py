"""A multi-node Ray cluster on this machine's loopback, for the tests: a head (no CPUs, so that
trials run on the worker nodes) and ``--nodes`` nodes of ``--cpus`` CPUs each, every server on
127.0.0.1 (``ray.cluster_utils.Cluster``: a second ``ray start --address`` on one host is refused
while clusters are off, and with them on Ray leaves loopback).

Run as ``python -m tests.search.ray_cluster --nodes 2``.  It prints one ``CLUSTER <json>`` line
(``address``; ``nodes``: ``node_id`` and ``raylet_pid`` of each worker node), then reads commands
on stdin: ``kill <node_id>`` SIGKILLs that node's raylet (its workers die with it), and the end of
input shuts the cluster down."""
import argparse
import json
import os
import signal
import sys

# before Ray is imported: it reads the switch once, at import
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

# a dead node is noticed in about 3 s, not Ray's default 30 s
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                      "health_check_initial_delay_ms": 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS})
    nodes = [cluster.add_node(num_cpus=args.cpus, node_ip_address="127.0.0.1") for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    described = [{"node_id": node.node_id,
                  "raylet_pid": node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid}
                 for node in nodes]
    print("CLUSTER " + json.dumps({"address": cluster.address, "nodes": described}), flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["kill"]:
                (pid,) = [n["raylet_pid"] for n in described if n["node_id"] == command[1]]
                os.kill(pid, signal.SIGKILL)
                print(f"KILLED {command[1]}", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
