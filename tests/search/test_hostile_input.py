"""Hostile input to the command line: spec files that are not plain files, YAML alias bombs and
deep nesting, absurd sizes, system folders, and outputs that are devices, FIFOs or sockets.
Each is one error line naming the file, exit status 2, fast, and nothing written."""
import os
import resource
import socket
import stat
import subprocess
import sys
import time
import warnings

import pytest
import yaml

from gsmsearch.cli import main
from gsmsearch.search import SpecError, spec_from_dict
from gsmsearch.search._spec import MAX_CHOICES, MAX_SPEC_BYTES, MAX_TOTAL_CHOICES, MAX_YAML_NODES, read_yaml

from .conftest import TINY_SPEC

MEMORY_LIMIT = 3 << 30  # address space of a CLI subprocess: a runaway read fails instead of swapping


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cli(*args, timeout=60, cwd=None):
    """``gsmsearch ARGS`` in a real process, bounded in time and memory; (code, stderr, seconds)."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "gsmsearch", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, preexec_fn=_limit_memory, cwd=cwd)
    return out.returncode, out.stderr, time.monotonic() - start


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("gsmsearch: error: "), lines[0][:2000]
    return lines[0]


# -- spec files that are not plain files -------------------------------------------------------

def test_spec_that_is_a_symlink_loop(tmp_path, capsys):
    os.symlink(tmp_path / "b.yaml", tmp_path / "a.yaml")
    os.symlink(tmp_path / "a.yaml", tmp_path / "b.yaml")
    assert main(["launch", str(tmp_path / "a.yaml")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'a.yaml'}: cannot read the file: Too many levels of symbolic links" in line


def test_spec_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "study.yaml"
    os.mkfifo(fifo)
    code, err, _ = run_cli("launch", fifo, timeout=60)  # reading a FIFO without a writer blocks for ever
    assert code == 2
    assert f"{fifo}: cannot read the file: it is a FIFO, not a regular file" in one_error_line(err)


def test_spec_that_is_a_link_to_dev_zero_is_refused_without_reading(tmp_path):
    link = tmp_path / "study.yaml"
    os.symlink("/dev/zero", link)
    code, err, seconds = run_cli("status", link, timeout=60)
    assert code == 2
    assert f"{link}: cannot read the file: it is a character device, not a regular file" in one_error_line(err)
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)


def test_spec_larger_than_the_cap_is_refused(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC) + "#" + "x" * MAX_SPEC_BYTES + "\n")
    assert main(["launch", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path}: the file has {path.stat().st_size} bytes; a spec file may have at most {MAX_SPEC_BYTES}" in line


def test_spec_nested_50000_deep(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("name: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert main(["launch", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path}: nested deeper than 64 levels (line 1, column" in line


def test_alias_that_contains_itself(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("name: &a [*a]\n")
    assert main(["launch", str(path)]) == 2
    assert f"{path}: an alias at line 1 refers to a node that contains it" in one_error_line(capsys.readouterr().err)


# -- alias bombs ("billion laughs") --------------------------------------------------------------

LAUGHS = "\n".join(
    [f"x0: &l0 [{', '.join(['lol'] * 9)}]"]
    + [f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
)  # *l8 expands to 9**9 (387 million) strings


@pytest.mark.parametrize("where", [
    "families: {lowrank: {budget: *l8}}",
    "workload: {name: digits-mlp, include: *l8}",
    "name: *l8",
    "families: {lowrank: {budget: 0.25, options: {rank: *l8}}}",
])
def test_alias_bomb_is_refused_fast(tmp_path, where):
    base = {k: v for k, v in TINY_SPEC.items() if k != where.split(":")[0]}
    path = tmp_path / "study.yaml"
    path.write_text(LAUGHS + "\n" + where + "\n" + yaml.safe_dump(base))
    code, err, seconds = run_cli("launch", path, timeout=60)
    assert code == 2
    line = one_error_line(err)
    assert f"{path}: the document expands (aliases followed) to more than {MAX_YAML_NODES} values" in line
    assert seconds < 20  # a Python start and the YAML parse; expanding it took minutes or all memory


def test_aliases_within_the_bound_are_expanded(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("base: &b [0.1, 0.2]\nother: *b\nmerged: {<<: {x: 1}, y: 2}\n")
    assert read_yaml(path) == {"base": [0.1, 0.2], "other": [0.1, 0.2], "merged": {"x": 1, "y": 2}}


def test_echoed_values_are_cut(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPEC, "name": "é" + "x" * 500_000,
                                    "workload": {**TINY_SPEC["workload"], "lr_schedule": "y" * 500_000}}))
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: name: String should have at most 200 characters" in err
    assert f"{path}: workload.lr_schedule:" in err
    assert all(len(line) < 1000 for line in err.splitlines()), max(map(len, err.splitlines()))


# -- absurd sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ({"trials": 10**26}, r"trials: Input should be less than or equal to 100000 \(got 10{26}\)"),
    ({"concurrency": 10_000}, r"concurrency: Input should be less than or equal to 4096 \(got 10000\)"),
    ({"retries": 1000}, r"retries: Input should be less than or equal to 100 \(got 1000\)"),
    ({"workload": {**TINY_SPEC["workload"], "epochs": 10**12}},
     r"workload.epochs: Input should be less than or equal to 10000 \(got 1000000000000\)"),
    ({"workload": {**TINY_SPEC["workload"], "seeds": list(range(1001))}},
     r"workload.seeds: List should have at most 1000 items"),
    ({"families": {"lowrank": {"budget": [0.5] * (MAX_CHOICES + 1)}}},
     rf"families.lowrank.budget.choices: {MAX_CHOICES + 1} choices; at most {MAX_CHOICES} per parameter"),
])
def test_absurd_sizes_are_refused_naming_field_value_and_bound(override, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict({**TINY_SPEC, **override}, "s.yaml")


def test_total_choices_are_bounded():
    choices = [round(0.01 + i * 0.9 / MAX_CHOICES, 6) for i in range(MAX_CHOICES)]
    families = {f: {"budget": choices, "lr": choices} for f in ("gblr", "lowrank", "monarch", "blockdiag", "blast", "dense")}
    total = sum(len(s["budget"]) + len(s["lr"]) for s in families.values())
    assert total > MAX_TOTAL_CHOICES
    start = time.monotonic()
    with pytest.raises(SpecError, match=rf"families: the families list {total} choices in all; at most "
                                        rf"{MAX_TOTAL_CHOICES} per study"):
        spec_from_dict({**TINY_SPEC, "families": families}, "s.yaml")
    assert time.monotonic() - start < 10


def test_a_million_choices_are_refused_fast(tmp_path):
    path = tmp_path / "study.yaml"
    base = yaml.safe_dump({k: v for k, v in TINY_SPEC.items() if k != "families"})
    path.write_text(base + "families: {lowrank: {budget: [" + ", ".join(["0.5"] * 1_000_000) + "]}}\n")
    code, err, seconds = run_cli("launch", path, "--dry-run", timeout=60)
    assert code == 2
    assert f"{path}: the file has {path.stat().st_size} bytes" in one_error_line(err)
    assert seconds < 20


def test_many_choices_within_the_bounds_validate_in_linear_time():
    """Two knobs of 1,000 choices each: tried one by one and paired at their ends, not 10**6 pairs."""
    lrs = [round(1e-4 * (1 + i), 8) for i in range(MAX_CHOICES)]
    decays = [round(1e-6 * i, 10) for i in range(MAX_CHOICES)]
    start = time.monotonic()
    spec = spec_from_dict({**TINY_SPEC, "families": {"lowrank": {"budget": 0.25, "lr": lrs, "weight_decay": decays}}})
    assert time.monotonic() - start < 10
    assert len(spec.families["lowrank"].lr.choices) == MAX_CHOICES


def test_option_values_among_many_budgets_are_checked_in_bounded_time():
    """1,000 budgets and 1,000 option values per family: the largest budget first, so an accepted
    value costs one layer build; the refused one is still found and named."""
    budgets = [round(0.05 + 0.9 * i / 999, 5) for i in range(1000)]
    spec = {**TINY_SPEC, "workload": {**TINY_SPEC["workload"], "mode": "finetune"},
            "families": {"lowrank": {"budget": budgets, "options": {"rank": list(range(1, 1001))}}}}
    start = time.monotonic()
    with pytest.raises(SpecError, match=r"families.lowrank.options.rank: 16 is refused by lowrank at every budget "
                                        r"\(tried on a 32x32 layer\): rank=16 .* more than budget=0.95 of 32x32"):
        spec_from_dict(spec)
    assert time.monotonic() - start < 30


def test_option_checks_stop_at_the_build_limit(monkeypatch):
    """Beyond MAX_OPTION_BUILDS layer builds, the values not yet tried are left to the trials."""
    import gsmsearch.search._space as space

    spec = {**TINY_SPEC, "workload": {**TINY_SPEC["workload"], "mode": "finetune"},
            "families": {"lowrank": {"budget": [0.5, 0.9], "options": {"rank": list(range(1, 17))}}}}
    with pytest.raises(SpecError, match=r"options.rank: 15 is refused"):
        spec_from_dict(spec)
    monkeypatch.setattr(space, "MAX_OPTION_BUILDS", 10)
    assert spec_from_dict(spec).families["lowrank"].options["rank"].choices[-1] == 16


def test_bad_value_among_many_choices_is_still_found():
    lrs = [round(1e-4 * (1 + i), 8) for i in range(50)] + [-1.0]
    decays = [round(1e-6 * i, 10) for i in range(50)]
    with pytest.raises(SpecError, match=r"families.lowrank.lr: .*-1"):
        spec_from_dict({**TINY_SPEC, "families": {"lowrank": {"budget": 0.25, "lr": lrs, "weight_decay": decays}}})


# -- system folders -----------------------------------------------------------------------------

@pytest.mark.parametrize("workdir, message", [
    ("/", "workdir: / is a system folder"),
    ("/etc", "workdir: /etc is inside /etc, a system folder"),
    ("/usr/local/share/runs", "workdir: /usr/local/share/runs is inside /usr, a system folder"),
    ("/proc/self", "is inside /proc, a system folder"),
    ("/var", "workdir: /var is a system folder"),
    ("/tmp", "workdir: /tmp is a system folder"),
])
def test_system_folder_as_workdir_is_refused(tmp_path, capsys, workdir, message):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPEC, "workdir": workdir}))
    assert main(["launch", str(path), "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path}: " in line and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_relative_workdir_reaching_a_system_folder_is_refused(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    up = "../" * (len(tmp_path.parts) + 2)
    path.write_text(yaml.safe_dump({**TINY_SPEC, "workdir": up + "etc/gsm"}))
    assert main(["launch", str(path), "--dry-run"]) == 2
    assert f"{path}: workdir: /etc/gsm is inside /etc, a system folder" in one_error_line(capsys.readouterr().err)


def test_ordinary_workdirs_are_accepted(tmp_path, capsys):
    for workdir in (str(tmp_path / "runs"), "runs", "/tmp/gsmsearch-runs"):
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump({**TINY_SPEC, "workdir": workdir}))
        assert main(["launch", str(path), "--dry-run"]) == 0, capsys.readouterr().err


def test_train_checkpoint_dir_in_a_system_folder_is_refused(capsys):
    # /proc and /sys refuse new folders even to root: a regression fails here without writing
    for folder in ("/proc/gsm-checkpoints", "/sys/gsm-checkpoints"):
        assert main(["train", "--checkpoint-dir", folder, "--epochs", "1"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"--checkpoint-dir {folder}: {folder} is inside /{folder.split('/')[1]}, a system folder" in line
        assert not os.path.exists(folder)


def test_train_options_json_too_deep_or_too_long(capsys):
    for flag in ("--workload-options", "--family-options"):
        for text, message in (("[" * 20_000 + "]" * 20_000, "expected a JSON object, got one nested too deeply"),
                              ('{"a": "' + "x" * 70_000 + '"}', "expected a JSON object of at most 65536 characters")):
            with pytest.raises(SystemExit) as exit_:
                main(["train", flag, text])
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {flag}: {message}" in err
            assert len(err) < 3000


def test_dashboard_and_report_targets_that_are_not_plain_files(tmp_path, capsys):
    os.symlink(tmp_path / "b.yaml", tmp_path / "a.yaml")
    os.symlink(tmp_path / "a.yaml", tmp_path / "b.yaml")
    for command in ("report", "dashboard", "status", "export"):
        assert main([command, str(tmp_path / "a.yaml")]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{tmp_path / 'a.yaml'}: cannot read the file: Too many levels of symbolic links" in line
    fifo = tmp_path / "dash.yaml"
    os.mkfifo(fifo)
    code, err, _ = run_cli("report", fifo, timeout=60)
    assert code == 2
    assert f"{fifo}: cannot read the file: it is a FIFO, not a regular file" in one_error_line(err)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS + "\nstudies: *l8\n")
    assert main(["report", str(bomb)]) == 2
    assert "to more than 100000 values" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.yaml", "bomb.yaml", "dash.yaml"]


# -- unset variables in the storage URL ---------------------------------------------------------

def test_unset_variable_in_the_storage_url_names_the_spec_and_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GSM_UNSET_PW", raising=False)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY_SPEC, "storage": "postgresql+psycopg://u:${GSM_UNSET_PW}@127.0.0.1:1/db"}))
    for command in (["launch", str(path)], ["status", str(path)], ["export", str(path)]):
        assert main(command) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{path}: storage: ${{GSM_UNSET_PW}} is not set" in line, command
        assert "%24" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_unset_variable_in_a_storage_url_given_on_the_command_line_is_not_encoded(capsys, monkeypatch):
    monkeypatch.delenv("GSM_UNSET_DIR", raising=False)
    assert main(["list", "--storage", "sqlite:///${GSM_UNSET_DIR}/x.db"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "storage URL sqlite:///${GSM_UNSET_DIR}/x.db uses ${GSM_UNSET_DIR}, which is not set" in line


# -- outputs: regular files or new paths only ---------------------------------------------------

def _seed(url):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="seeded", storage=url, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["quality", "relative_flops"])
    for i, (q, f) in enumerate([(0.8, 0.2), (0.9, 0.4)]):
        study.add_trial(optuna.trial.create_trial(
            params={"family": "lowrank", "lowrank.budget": f},
            distributions={"family": CategoricalDistribution(["lowrank"]),
                           "lowrank.budget": FloatDistribution(0.01, 1.0)},
            values=[q, f], user_attrs={"family": "lowrank", "config": {"family": "lowrank", "budget": f}}))


@pytest.fixture
def study_db(tmp_path):
    path = tmp_path / "studies.db"
    _seed(f"sqlite:///{path}")
    return path


def _special_targets(tmp_path):
    """(name, path) of a FIFO, a socket and links to them, made in ``tmp_path``."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "out.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    os.symlink(fifo, tmp_path / "link-to-fifo")
    os.symlink(sock_path, tmp_path / "link-to-sock")
    return sock, {"fifo": (fifo, "a FIFO"), "socket": (sock_path, "a socket"),
                  "link to a FIFO": (tmp_path / "link-to-fifo", "a FIFO"),
                  "link to a socket": (tmp_path / "link-to-sock", "a socket")}


def _commands(study_db, output):
    storage = f"sqlite:///{study_db}"
    return {
        "report": ["report", "seeded", "--storage", storage, "-o", str(output)],
        "export csv": ["export", "seeded", "--storage", storage, "-o", str(output)],
        "export parquet": ["export", "seeded", "--storage", storage, "--format", "parquet", "-o", str(output)],
    }


def test_outputs_that_are_fifos_sockets_or_links_to_them_are_refused(tmp_path, study_db, capsys):
    sock, targets = _special_targets(tmp_path)
    # a reader on the FIFO: a command that wrongly writes into it finishes (and fails the test)
    reader = os.open(targets["fifo"][0], os.O_RDONLY | os.O_NONBLOCK)
    try:
        for name, (target, kind) in targets.items():
            for command, argv in _commands(study_db, target).items():
                assert main(argv) == 2, (name, command)
                line = one_error_line(capsys.readouterr().err)
                assert f"-o/--output {target}: is {kind}; expected a regular file or a new path" in line
        try:
            assert os.read(reader, 1 << 16) == b""  # nothing was written into the FIFO
        except BlockingIOError:
            pass
    finally:
        os.close(reader)
        sock.close()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out.fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(tmp_path / "out.sock").st_mode)
    assert os.path.islink(tmp_path / "link-to-fifo") and os.path.islink(tmp_path / "link-to-sock")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def dev_guard(monkeypatch):
    """Renames and removals of anything under /dev fail the test instead of replacing a device
    node (run as root, a command that renames its output over /dev/null would do just that)."""
    def guarded(name):
        original = getattr(os, name)

        def call(*args, **kwargs):
            for path in args[:2]:
                if os.path.abspath(os.fspath(path)).startswith("/dev/"):
                    raise AssertionError(f"os.{name} on {path}: a device node would be replaced")
            return original(*args, **kwargs)

        monkeypatch.setattr(os, name, call)

    for name in ("replace", "rename", "unlink", "remove"):
        guarded(name)

    def new_under_dev(path) -> bool:
        try:
            full = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return full.startswith("/dev/") and not os.path.lexists(full)

    import builtins
    import io

    def guarded_open(original):
        def call(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and new_under_dev(file):
                raise AssertionError(f"open({file!r}, {mode!r}): a file would be created in /dev")
            return original(file, mode, *args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", guarded_open(builtins.open))
    monkeypatch.setattr(io, "open", guarded_open(io.open))
    os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and new_under_dev(path):
            raise AssertionError(f"os.open({path!r}, O_CREAT): a file would be created in /dev")
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_os_open)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_output_to_a_device_is_refused_and_the_device_kept(tmp_path, study_db, capsys, dev_guard, device):
    before = os.stat(device)
    assert stat.S_ISCHR(before.st_mode)
    for command, argv in _commands(study_db, device).items():
        assert main(argv) == 2, command
        assert f"-o/--output {device}: is a character device" in one_error_line(capsys.readouterr().err)
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert not os.path.exists(device + ".tmp")


def test_outputs_replace_a_regular_file_and_keep_its_mode(tmp_path, study_db, capsys):
    for command, argv in _commands(study_db, tmp_path / "out.bin").items():
        target = tmp_path / "out.bin"
        target.write_text("old")
        os.chmod(target, 0o640)
        assert main(argv) == 0, capsys.readouterr().err
        assert target.read_bytes() != b"old" and target.stat().st_size > 100, command
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        target.unlink()
    assert main(_commands(study_db, tmp_path / "new.csv")["export csv"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "new.csv").read_text().startswith("number,")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_through_a_link_replaces_the_file_it_names(tmp_path, study_db, capsys):
    real = tmp_path / "real.csv"
    real.write_text("old")
    os.symlink(real, tmp_path / "link.csv")
    assert main(_commands(study_db, tmp_path / "link.csv")["export csv"]) == 0, capsys.readouterr().err
    assert os.path.islink(tmp_path / "link.csv")
    assert real.read_text().startswith("number,")


# -- storages that are not regular files --------------------------------------------------------

def test_sqlite_storage_that_is_a_fifo_or_socket_is_refused(tmp_path):
    """Opened for writing (launch) and for reading (list): refused, no journal beside it.  In a
    separate process: SQLite reading a FIFO would block."""
    sock, targets = _special_targets(tmp_path)
    script = """
import sys
from gsmsearch.cli import main
from gsmsearch.search._storage import open_storage
for target in sys.argv[1:]:
    try:
        open_storage("sqlite:///" + target)
        print("opened", target)
    except ValueError as error:
        print("refused:", error)
    print("list exit", main(["list", "--storage", "sqlite:///" + target]))
"""
    try:
        out = subprocess.run([sys.executable, "-c", script, *(str(t) for t, _ in targets.values())],
                             capture_output=True, text=True, timeout=120)
    finally:
        sock.close()
    assert out.returncode == 0, out.stderr[-2000:]
    for target, _ in targets.values():
        assert f"refused: storage sqlite:///{target}: {target} is not a regular file" in out.stdout, out.stdout
        assert f"gsmsearch: error: storage sqlite:///{target}: {target} is not a regular file" in out.stderr
    assert out.stdout.count("list exit 2") == len(targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link-to-fifo", "link-to-sock", "out.fifo", "out.sock"]
