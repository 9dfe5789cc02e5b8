"""Study specs: the malformed-spec corpus gets clear errors and writes nothing."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gsmsearch.cli import main
from gsmsearch.search import SpecError, load_spec, spec_from_dict

from .conftest import TINY_SPEC

BAD = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first[len("# expect: "):]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_spec_is_rejected_naming_file_and_key(path, tmp_path, capsys, monkeypatch):
    spec = tmp_path / path.name
    spec.write_text(path.read_text())
    monkeypatch.chdir(tmp_path)
    code = main(["launch", str(spec)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(spec) in err  # the file is named
    assert re.search(expected_message(path), err), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written


def test_bad_spec_writes_nothing_to_postgres(tmp_path, postgres_url, capsys):
    import sqlalchemy

    spec = {**TINY_SPEC, "storage": postgres_url, "trials": "many"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["launch", str(path)]) == 2
    assert "trials: Input should be a valid integer" in capsys.readouterr().err
    engine = sqlalchemy.create_engine(postgres_url)
    assert sqlalchemy.inspect(engine).get_table_names() == []  # not even Optuna's tables
    engine.dispose()


def test_missing_and_unreadable_files(tmp_path, capsys):
    assert main(["launch", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    (tmp_path / "dir.yaml").mkdir()
    assert main(["launch", str(tmp_path / "dir.yaml")]) == 2
    assert "dir.yaml: cannot read the file" in capsys.readouterr().err


def test_cli_exit_status_in_a_real_process(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((Path(__file__).parent / "bad_specs" / "unknown_key.yaml").read_text())
    out = subprocess.run([sys.executable, "-m", "gsmsearch", "launch", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"{path}: concurency: unknown key" in out.stderr


def test_spec_canonical_hash_ignores_formatting_but_not_content():
    a = spec_from_dict(TINY_SPEC)
    b = spec_from_dict(yaml.safe_load(yaml.safe_dump(TINY_SPEC, default_flow_style=True)))
    assert a.digest() == b.digest()
    c = spec_from_dict({**TINY_SPEC, "trials": 5})
    assert c.digest() != a.digest()
    # a field written out at its default hashes like the spec without it, so knobs added by a
    # later version do not make an older study's spec "different" on --resume
    families = {name: {**space, "lr_schedule": None, "warmup_epochs": None}
                for name, space in TINY_SPEC["families"].items()}
    d = spec_from_dict({**TINY_SPEC, "families": families,
                        "workload": {**TINY_SPEC["workload"], "warmup_epochs": 0.0}})
    assert d.digest() == a.digest()
    e = spec_from_dict({**TINY_SPEC, "workload": {**TINY_SPEC["workload"], "lr_schedule": "cosine"}})
    assert e.digest() != a.digest()
    # defaults are part of the canonical form: writing a default explicitly changes nothing
    d = spec_from_dict({**TINY_SPEC, "retries": 1})
    assert d.digest() == a.digest()


def test_shorthands_for_parameters():
    spec = spec_from_dict({**TINY_SPEC, "families": {"gblr": {
        "budget": [0.1, 0.2], "lam": {"low": 1e-4, "high": 1e-1, "log": True}, "structure_lr": 0.01,
        "options": {"rank_per_component": [1, 2]}}}})
    space = spec.families["gblr"]
    assert space.budget.choices == [0.1, 0.2]
    assert space.lam.log and space.lam.low == 1e-4
    assert space.structure_lr == 0.01
    assert space.options["rank_per_component"].choices == [1, 2]


def test_space_size_counts_distinct_configurations():
    from gsmsearch.search._space import space_size

    spec = spec_from_dict({**TINY_SPEC, "workload": {**TINY_SPEC["workload"], "seeds": [0, 1, 2]},
                           "families": {"gblr": {"budget": {"low": 0.1, "high": 0.5}},
                                        "lowrank": {"budget": [0.1, 0.3], "lr": [0.001, 0.01]},
                                        "dense": {}}})
    assert space_size(spec, "gblr") is None  # a range: unbounded
    assert space_size(spec, "lowrank") == 3 * 2 * 2
    assert space_size(spec, "dense") == 3


EXAMPLES = sorted((Path(__file__).parents[2] / "studies").glob("*.yaml"))


def test_the_example_studies_are_there():
    names = {path.stem for path in EXAMPLES}
    assert len(names) >= 5 and "quickstart" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_studies_are_valid(path):
    spec = load_spec(path)  # the same checks as `gsmsearch launch`, knob values included
    assert spec.families and spec.trials >= 1


def test_family_option_names_follow_the_mode_and_the_fit_method():
    finetune = {**TINY_SPEC, "workload": {**TINY_SPEC["workload"], "mode": "finetune"},
                "families": {"gblr": {"budget": 0.2, "fit_method": ["greedy", "reference"],
                                      "options": {"refit_passes": 1, "steps": 10,
                                                  "recompute_intermediate": [True, False]}},
                             "lowrank": {"budget": 0.2, "options": {"rank": 2}}}}
    spec_from_dict(finetune)  # fit options of both methods, from_dense options: accepted
    scratch = {**finetune, "workload": TINY_SPEC["workload"],
               "families": {"gblr": {"budget": 0.2, "options": {"refit_passes": 1}}}}
    with pytest.raises(SpecError, match=r"families\.gblr\.options\.refit_passes: unknown option of "
                                        r"gblr in scratch mode"):
        spec_from_dict(scratch)  # scratch GBLR is constructed, not fitted


def test_family_option_value_refused_only_at_some_budgets_is_left_to_the_trials():
    """monarch num_blocks=8 does not fit a 256x64 layer at 0.3 of its FLOPs but does at 1.0: the
    study may search that combination (those trials fail alone); at 0.3 alone it is an error."""
    base = {"name": "s", "trials": 2, "workload": {"name": "digits-mlp", "mode": "finetune", "epochs": 2}}
    spec_from_dict({**base, "families": {"monarch": {"budget": [0.3, 1.0], "options": {"num_blocks": [32, 8]}}}})
    with pytest.raises(SpecError, match=r"families\.monarch\.options\.num_blocks: 8 is refused by monarch at every budget"):
        spec_from_dict({**base, "families": {"monarch": {"budget": 0.3, "options": {"num_blocks": [32, 8]}}}})


@pytest.mark.parametrize("where", ["objectives", "constraints"])
@pytest.mark.parametrize("metric, why", [
    ("test_quality", "choosing on the test split would leave no unbiased estimate of the front's quality"),
    ("val_quality", "it is quality itself, under a name that says its split"),
])
def test_recorded_only_metrics_are_refused_as_objectives_and_constraints(where, metric, why):
    entry = {"metric": metric} if where == "objectives" else {"metric": metric, "min": 0.5}
    with pytest.raises(SpecError) as refused:
        spec_from_dict({**TINY_SPEC, where: [entry]})
    assert str(refused.value) == (
        f"<spec>: {where}[0].metric: {metric} is recorded for every trial but cannot be an objective or a "
        f"constraint ({why}); use quality, the workload's metric on the validation split")
