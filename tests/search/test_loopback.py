"""A local Ray started by gsmsearch keeps every server on 127.0.0.1, even when ``ray`` was
imported before (Ray reads its cluster switch once, at import)."""
import pytest

from tests.fresh_process import fresh_python

CHECK = r"""
import ipaddress, json, os
import ray  # imported first, as a user's notebook or the test process would
from gsmsearch.search._runner import start_ray
start_ray(None, num_cpus=1)

@ray.remote
def where():
    return ray.util.get_node_ip_address()

node_addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
gcs = ray.get_runtime_context().gcs_address
task_address = ray.get(where.remote())
session = ray._private.worker._global_node.get_session_dir_path()


def listening_addresses(session):
    # This Ray's processes (their command lines name its session folder), their sockets, and
    # the local address of each of those that listens (/proc/net/tcp{,6}, state 0A).
    inodes, servers = set(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if session.encode() not in f.read():
                    continue
            servers += 1
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:
                    continue
                raw = bytes.fromhex(fields[1].split(":")[0])
                if width == 8:
                    found.add(".".join(str(b) for b in raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    address = ipaddress.IPv6Address(words)
                    found.add(str(address.ipv4_mapped or address))
    return servers, found


servers, listening = listening_addresses(session)
env_after = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
auth_after = os.environ.get("RAY_AUTH_MODE")
ray.shutdown()
print("RESULT " + json.dumps({"nodes": node_addresses, "gcs": gcs, "task": task_address,
                             "listening": sorted(listening), "servers": servers,
                             "env_after": env_after, "auth_after": auth_after}))
"""


def test_local_ray_binds_loopback_only():
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    seen = fresh_python(CHECK, env=env, timeout=180)
    assert seen["nodes"] == ["127.0.0.1"]
    assert seen["gcs"].startswith("127.0.0.1:")
    assert seen["task"] == "127.0.0.1"
    assert seen["servers"] >= 2  # the GCS and the raylet at least were found and inspected
    assert seen["listening"] == ["127.0.0.1"], seen["listening"]
    # the switch is put back, so a later ray.init(address=...) in the same process is not held to it
    assert seen["env_after"] is None
    # no token between this process (and its children) and its Ray, also at later calls
    assert seen["auth_after"] == "disabled"
