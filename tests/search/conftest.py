"""Fixtures for the search tests: a real PostgreSQL server on loopback, tiny study specs."""
import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if not found:
        pytest.fail(f"PostgreSQL binary {name!r} not found; scripts/test-services.sh installs it")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth), stopped after the session."""
    import tempfile

    # not under pytest's tmp dir: that one is private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="gsmsearch-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    shutil.chown(root, 'postgres') if os.geteuid() == 0 else None
    os.chmod(root, 0o755)
    os.chmod(sock, 0o777)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(as_postgres + [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    port = _free_port()
    ctl = as_postgres + [_pg_bin("pg_ctl"), "-D", str(data)]
    # max_connections: several drivers and their workers at once in one test (the default is 100);
    # the fault tests restart the server with the same options (``server["options"]``)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c max_connections=300"
    subprocess.run(ctl + ["-o", options, "-l",
                          str(root / "log"), "-w", "start"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    server = {"port": port, "ctl": ctl, "data": data, "sock": sock, "root": root, "options": options,
              "url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"}
    yield server
    subprocess.run(ctl + ["-m", "immediate", "-w", "stop"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database per test on the session's server."""
    import psycopg

    name = "t_" + request.node.name.lower().replace("[", "_").replace("]", "").replace("-", "_")[:40]
    with psycopg.connect(f"host=127.0.0.1 port={postgres_server['port']} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server['port']}/{name}"
    # the connections this test left open (pools of storages it no longer holds) end with it, so
    # that the tests after it on this server do not run out of connections
    try:
        with psycopg.connect(f"host=127.0.0.1 port={postgres_server['port']} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    except psycopg.OperationalError:
        pass  # the server is down (a fault test stopped it): nothing is connected


TINY_SPEC = {
    "name": "tiny",
    "workload": {"name": "digits-mlp", "options": {"hidden_sizes": [32, 32]}, "epochs": 2,
                 "batch_size": 64, "lr": 0.003},
    "families": {"gblr": {"budget": {"low": 0.1, "high": 0.5}}, "lowrank": {"budget": [0.1, 0.3]}},
    "constraints": [{"metric": "relative_flops", "max": 0.35}],
    "trials": 4,
    "concurrency": 2,
    "executor": {"num_cpus": 2},
}


@pytest.fixture
def write_spec(tmp_path):
    def write(overrides=None, name="study.yaml"):
        spec = {**TINY_SPEC, **(overrides or {})}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        return path

    return write
