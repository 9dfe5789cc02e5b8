"""Workloads named by a reference to a user's class: a file beside the spec, an importable module,
an installed package's entry point; their errors name workload.name and the user's file:line."""
from __future__ import annotations

import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from gsmsearch.search._spec import SpecError, load_spec
from gsmsearch.trainer import TrialConfig, run_trial
from gsmsearch.workloads import (WorkloadCodeError, WorkloadReferenceError, entry_point_names, get_workload,
                                 resolve_workload)
from gsmsearch.workloads import _plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_model" / "my_workload.py"


def line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` that contains ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def write_spec(folder: Path, name: str, **workload) -> Path:
    spec = {"name": "plugin", "workload": {"name": name, "epochs": 1, **workload},
            "families": {"lowrank": {"budget": 0.5}}, "trials": 1}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def beside(tmp_path, monkeypatch):
    """A folder holding the example workload file; the spec is written there too.  Its sibling
    imports (``from my_workload import ...``) find this folder's copy."""
    shutil.copy(EXAMPLE, tmp_path / "my_workload.py")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_workload", raising=False)
    return tmp_path


def test_a_file_beside_the_spec_is_resolved_relative_to_the_spec(beside, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # not the spec's folder
    spec = load_spec(write_spec(beside, "my_workload.py:TumourClassifier", options={"width": 8}))
    workload = get_workload(spec.workload.name, **spec.workload.options)  # as a trial resolves it
    assert type(workload).__name__ == "TumourClassifier" and workload.name == "TumourClassifier"
    assert workload.options() == {"width": 8, "depth": 2}
    # a plain nn.Module: its candidate layers are plain nn.Linear, chosen by candidate_patterns
    model = workload.build_model()
    assert workload.candidate_layer_names(model) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1",
                                                     "blocks.1.fc2"]


def test_a_worker_runs_the_shipped_text_without_the_file(beside, monkeypatch):
    load_spec(write_spec(beside, "my_workload.py:TumourClassifier"))
    shipped = _plugins.shipped_files()
    (beside / "my_workload.py").unlink()
    monkeypatch.setattr(_plugins, "_FILES", {})
    monkeypatch.setattr(_plugins, "_MODULES", {})
    with pytest.raises(WorkloadReferenceError, match="my_workload.py does not exist"):
        resolve_workload("my_workload.py:TumourClassifier")
    _plugins.receive_files(shipped)  # what a Ray worker does when it is created
    cls = resolve_workload("my_workload.py:TumourClassifier")
    assert cls.__module__.startswith("_gsmsearch_workload_my_workload_")
    assert cls.__module__ in sys.modules


def test_a_module_reference_and_an_entry_point(tmp_path, monkeypatch):
    package = tmp_path / "tumourplug"
    package.mkdir()
    shutil.copy(EXAMPLE, package / "__init__.py")
    dist = tmp_path / "tumourplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tumourplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gsmsearch.workloads]\ntumour-test = tumourplug:TumourClassifier\n")
    with pytest.raises(WorkloadReferenceError, match="unknown workload 'tumour-test'"):
        resolve_workload("tumour-test")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tumour-test" in entry_point_names()
    by_entry = resolve_workload("tumour-test")
    by_module = resolve_workload("tumourplug:TumourClassifier")
    assert by_entry is by_module and by_entry.__module__ == "tumourplug"
    assert get_workload("tumour-test", depth=1).name == "TumourClassifier"


@pytest.mark.parametrize("name, message", [
    ("no_such_module_xyz.sub:Thing", r"no module named 'no_such_module_xyz'"),
    ("missing.py:Thing", r"missing.py does not exist \(relative to "),
    ("my_workload.py:Nope", r"my_workload.py has no class 'Nope'; its Workload classes: TumourClassifier"),
    ("my_workload.py:ResidualBlock", r"is a class, not a subclass of gsmsearch.workloads.Workload"),
    ("my_workload.py:DataSplits", r"is a class, not a subclass"),
    ("torch:nn", r"is module, not a subclass"),
    ("unknown-name", r"unknown workload 'unknown-name'; expected one of: .*digits-mlp.*path/to/file.py:ClassName"),
])
def test_bad_references_are_one_line_errors_naming_workload_name(beside, name, message):
    with pytest.raises(SpecError) as error:
        load_spec(write_spec(beside, name))
    text = str(error.value)
    assert "\n" not in text and "study.yaml: workload.name: " in text
    assert re.search(message, text), text


USER_ERRORS = {
    "import": ("import json\nimport no_such_dependency_xyz  # the user's import\n", "import no_such_dependency_xyz",
               r"importing workload file .*broken.py raised ModuleNotFoundError: No module named "
               r"'no_such_dependency_xyz' \(.*broken.py:{line} in <module>\)"),
    "syntax": ("x = 1\ndef f(:\n", "def f(:", r"workload file .*broken.py:{line}: SyntaxError"),
    "constructor": ("""
        from my_workload import TumourClassifier
        class Broken(TumourClassifier):
            def __init__(self, *, width=64):
                super().__init__(width=width)
                self.scale = 1 / 0  # the user's bug
        """, "1 / 0", r"workload.name: constructing 'broken.py:Broken' raised ZeroDivisionError: division by zero "
                      r"\(.*broken.py:{line} in __init__\)"),
    "option": ("""
        from my_workload import TumourClassifier
        class Broken(TumourClassifier):
            pass
        """, "class Broken", r"workload.options: width must be an integer >= 4, got 2 \(.*my_workload.py:\d+ in __init__\)"),
    "build_model": ("""
        from my_workload import TumourClassifier
        class Broken(TumourClassifier):
            def build_model(self):
                raise RuntimeError("no weights here")  # the user's bug
        """, "no weights here", r"workload.name: 'broken.py:Broken': build_model\(\) raised RuntimeError: no weights "
                                r"here \(.*broken.py:{line} in build_model\)"),
    "abstract": ("""
        from gsmsearch.workloads import Workload
        class Broken(Workload):
            def load_data(self, seed=0):
                pass
        """, "class Broken", r"'broken.py:Broken' does not implement build_model, example_batch"),
    "no_layers": ("""
        from my_workload import TumourClassifier
        class Broken(TumourClassifier):
            candidate_patterns = ()
        """, "class Broken", r"workload.include: no linear layer of 'broken.py:Broken' is left by include=\[\] .*"
                             r"set workload.include in the spec, or candidate_patterns on Broken"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_errors_in_the_users_file_name_its_line(beside, case):
    source, marker, message = USER_ERRORS[case]
    path = beside / "broken.py"
    path.write_text(textwrap.dedent(source))
    options = {"width": 2} if case == "option" else {}
    with pytest.raises(SpecError) as error:
        load_spec(write_spec(beside, "broken.py:Broken", options=options))
    text = str(error.value)
    assert "\n" not in text and text.startswith(f"{beside / 'study.yaml'}: workload."), text
    line = line_of(path, marker)
    assert re.search(message.format(line=line), text), text


def test_an_exception_in_the_users_code_during_a_trial_names_its_line(beside, tmp_path):
    path = beside / "failing.py"
    path.write_text(textwrap.dedent("""
        from my_workload import TumourClassifier
        class Failing(TumourClassifier):
            def load_data(self, seed=0):
                splits = super().load_data(seed)
                return splits.nothing  # the user's bug
        """))
    load_spec(write_spec(beside, "failing.py:Failing"))
    config = TrialConfig(workload="failing.py:Failing", family="lowrank", budget=0.5, epochs=1,
                         measure_latency=False)
    with pytest.raises(WorkloadCodeError) as error:
        run_trial(config, cache_dir=tmp_path / "cache")
    line = line_of(path, "splits.nothing")
    assert str(error.value) == (f"{_plugins._shown(str(path))}:{line} in load_data: AttributeError: "
                                f"'DataSplits' object has no attribute 'nothing'")
    # a built-in workload's errors are not rewritten
    with pytest.raises(ValueError, match="unknown structured family") as plain:
        run_trial(TrialConfig(workload="digits-mlp", family="nope", workload_options={"hidden_sizes": [8]}))
    assert not isinstance(plain.value, WorkloadCodeError)


def test_a_plugin_trial_runs_in_process(beside, tmp_path):
    load_spec(write_spec(beside, "my_workload.py:TumourClassifier"))
    config = TrialConfig(workload="my_workload.py:TumourClassifier", workload_options={"width": 16},
                         family="lowrank", budget=0.5, epochs=1, measure_latency=False)
    result = run_trial(config, cache_dir=tmp_path / "cache")
    assert set(result.layers) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"}
    assert 0.5 <= result.quality <= 1.0
    assert result.structured_relative_flops == pytest.approx(0.5, abs=0.05)
    assert torch.get_num_threads() >= 1


def test_an_entry_point_whose_package_fails_to_import_names_the_line(tmp_path, monkeypatch):
    (tmp_path / "badplug").mkdir()
    (tmp_path / "badplug" / "__init__.py").write_text("import os\nraise RuntimeError('broken plugin')\n")
    dist = tmp_path / "badplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gsmsearch.workloads]\nbad-test = badplug:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(WorkloadReferenceError, match=r"^workload 'bad-test' \(entry point badplug:Thing of badplug "
                                                     r"0.1\) cannot be loaded: RuntimeError: broken plugin "
                                                     r"\(.*badplug/__init__.py:2 in <module>\)$"):
        resolve_workload("bad-test")


def test_the_example_spec_is_valid_and_names_the_file_beside_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(EXAMPLE.parent / "study.yaml")
    assert spec.workload.name == "my_workload.py:TumourClassifier"
    cls = resolve_workload(spec.workload.name)
    assert Path(sys.modules[cls.__module__].__file__) == EXAMPLE
