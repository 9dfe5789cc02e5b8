"""Studies of a user's own workload on real Ray workers: a file beside the spec (its text shipped
to the workers), an installed package's entry point (found by the workers through PYTHONPATH), an
exception in the user's code recorded as the trial's failure with its file:line, and bad
references refused by the CLI before anything is written."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

from gsmsearch.search import launch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_model" / "my_workload.py"
GSMSEARCH = [sys.executable, "-m", "gsmsearch"]


def spec_in(folder: Path, name: str, **overrides) -> Path:
    spec = {"name": "own", "workload": {"name": name, "options": {"width": 16}, "epochs": 1},
            "families": {"lowrank": {"budget": [0.25, 0.5]}}, "trials": 2, "concurrency": 2,
            "retries": 0, "executor": {"num_cpus": 2}, **overrides}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_of(folder: Path, name: str = "own"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / f'{name}.db'}").get_trials()


@pytest.fixture
def beside(tmp_path, monkeypatch):
    shutil.copy(EXAMPLE, tmp_path / "my_workload.py")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_workload", raising=False)
    monkeypatch.chdir(ROOT)  # the workers' folder is not the spec's: the file reaches them as text
    return tmp_path


def test_a_workload_file_beside_the_spec_runs_on_ray_workers(beside, capsys):
    summary = launch(spec_in(beside, "my_workload.py:TumourClassifier"))
    assert (summary.completed, summary.failed) == (2, 0)
    trials = trials_of(beside)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        assert trial.user_attrs["config"]["workload"] == "my_workload.py:TumourClassifier"
        assert set(trial.user_attrs["layers"]) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    # two workers, each its own process: none of them ran in the driver
    assert len({t.user_attrs["ray_actor_id"] for t in trials}) == 2


def test_an_exception_in_the_users_code_fails_that_trial_with_its_line(beside):
    path = beside / "seeded.py"
    path.write_text(textwrap.dedent("""
        from my_workload import TumourClassifier

        class Seeded(TumourClassifier):
            def load_data(self, seed=0):
                if seed == 1:
                    raise RuntimeError("no data for seed 1")  # the user's bug
                return super().load_data(seed)
        """))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "no data for seed 1" in text)
    # two seeds: the second trial is the first one's configuration under seed 1
    summary = launch(spec_in(beside, "seeded.py:Seeded", families={"lowrank": {"budget": 0.5}},
                             workload={"name": "seeded.py:Seeded", "options": {"width": 16}, "epochs": 1,
                                       "seeds": [0, 1]}))
    assert (summary.completed, summary.failed) == (1, 1)
    by_seed = {t.user_attrs["config"]["seed"]: t for t in trials_of(beside)}
    assert by_seed[0].state.name == "COMPLETE"
    assert by_seed[1].state.name == "FAIL"
    reason = by_seed[1].user_attrs["failure_reason"]
    assert re.search(rf"seeded\.py:{line} in load_data: RuntimeError: no data for seed 1", reason), reason


def test_an_entry_point_workload_runs_through_the_cli(tmp_path):
    """The package is found by importlib.metadata on sys.path: the CLI's PYTHONPATH, which the
    local Ray's workers inherit."""
    site = tmp_path / "site"
    (site / "tumourplug").mkdir(parents=True)
    shutil.copy(EXAMPLE, site / "tumourplug" / "__init__.py")
    dist = site / "tumourplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tumourplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gsmsearch.workloads]\ntumour = tumourplug:TumourClassifier\n")
    spec = spec_in(tmp_path, "tumour")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([*GSMSEARCH, "launch", str(spec)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "2 complete, 0 failed" in run.stdout
    trials = trials_of(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.user_attrs["config"]["workload"] for t in trials} == {"tumour"}


BAD = {
    "missing module": ("no_such_module_xyz:Thing", None, None, r"no module named 'no_such_module_xyz'"),
    "missing class": ("my_workload.py:Nope", None, None, r"has no class 'Nope'"),
    "not a workload": ("my_workload.py:TabularResNet", None, None, r"not a subclass of gsmsearch.workloads.Workload"),
    "import error": ("broken.py:Broken", "import os\nimport no_such_dependency_xyz\n", "no_such_dependency_xyz",
                     r"ModuleNotFoundError: No module named 'no_such_dependency_xyz' \(.*broken\.py:{line} in <module>\)"),
    "raises at validation": ("broken.py:Broken", textwrap.dedent("""
        from my_workload import TumourClassifier

        class Broken(TumourClassifier):
            def build_model(self):
                return self.missing_attribute
        """), "self.missing_attribute",
        r"build_model\(\) raised AttributeError: .*missing_attribute.* \(.*broken\.py:{line} in build_model\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_references_exit_2_in_one_line_and_write_nothing(beside, case):
    name, source, marker, message = BAD[case]
    if source:
        (beside / "broken.py").write_text(source)
        line = next(i for i, text in enumerate(source.splitlines(), 1) if marker in text)
        message = message.format(line=line)
    spec = spec_in(beside, name)
    run = subprocess.run([*GSMSEARCH, "launch", str(spec)], capture_output=True, text=True, cwd=beside,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gsmsearch: error: {spec}: workload.name: "), run.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (beside / "own.db").exists() and not (beside / ".gsmsearch").exists()
