"""The Python API: compress, apply_structure, save/load, launch from a dict (docs/python-api.md)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import gsmsearch
from gsmsearch.search import SpecError
from gsmsearch.structured import (BudgetTooSmall, DenseLinear, LowRankLinear, StructuredLinear, export, family_names,
                                  model_cost)

from .fresh_process import fresh_python

STRUCTURED_FAMILIES = [name for name in family_names() if name != "dense"]


class Block(nn.Module):
    """A pre-norm transformer block: attention (q, k, v, o) and an MLP (fc1, fc2)."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, width)
        batch, tokens, width = x.shape
        h = self.norm1(x)
        # each (B, heads, T, width / heads)
        q, k, v = (f(h).view(batch, tokens, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        attended = torch.softmax(q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5, -1) @ v
        x = x + self.o(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def block() -> nn.Module:
    torch.manual_seed(0)
    return Block()


def inputs_of(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (8, 5, 64) if isinstance(model, Block) else (8, 64)
    return torch.randn(*shape, generator=generator)


# -- compress -----------------------------------------------------------------------------------

# The MLP's 10-wide head is left dense (exclude "4"): Monarch's cheapest 128 -> 10 layer costs more
# than these budgets.  The block at 0.5: GBLR's greedy fit of a random 64 x 64 weight at 0.25
# stops 0.022 short of the budget (fewer components than it may afford).
CASES = [(mlp, 0.25), (mlp, 0.5), (block, 0.5)]


@pytest.mark.parametrize("family", STRUCTURED_FAMILIES)
@pytest.mark.parametrize("build, budget", CASES, ids=["mlp-0.25", "mlp-0.5", "block-0.5"])
def test_compress_meets_the_budget_and_matches_its_export(family, build, budget):
    model = build()
    exclude = "4" if isinstance(model, nn.Sequential) else None
    returned = gsmsearch.compress(model, family=family, budget=budget, exclude=exclude)
    assert returned is model
    structured = {name: m for name, m in model.named_modules() if isinstance(m, StructuredLinear)}
    expected = ["0", "2"] if exclude else ["q", "k", "v", "o", "fc1", "fc2"]
    assert sorted(structured) == sorted(expected)
    assert all(m.family == family for m in structured.values())
    if exclude:
        assert type(model[4]) is nn.Linear
    cost = model_cost(model)
    layers = [cost.per_layer[name] for name in expected]
    relative = sum(layer["flops"] for layer in layers) / sum(layer["dense_flops"] for layer in layers)
    assert budget - 0.02 <= relative <= budget + 1e-9
    x = inputs_of(model)
    with torch.no_grad():
        torch.testing.assert_close(export(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_compress_fits_each_layer_to_its_dense_weight():
    dense = mlp()
    model = gsmsearch.compress(mlp(), family="lowrank", budget=0.5, exclude="4")
    for index in (0, 2):
        fitted = LowRankLinear.from_dense(dense[index].weight, dense[index].bias, budget=0.5)
        torch.testing.assert_close(model[index].to_dense(), fitted.to_dense(), rtol=0, atol=0)
        torch.testing.assert_close(model[index].bias, dense[index].bias, rtol=0, atol=0)
    torch.testing.assert_close(model[4].weight, dense[4].weight, rtol=0, atol=0)


def anisotropic_batches():
    """Inputs that use 4 of the 64 input directions, unequally."""
    generator = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(64, 4, generator=generator))[0]  # (64, 4)
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0])
    return [(torch.randn(4, 8, 4, generator=generator) * scales) @ basis.T for _ in range(4)]  # each (4, 8, 64)


def test_activation_allocation_follows_the_calibration_inputs():
    shares = {allocation: gsmsearch.layer_shares(block(), "lowrank", 0.3, allocation=allocation,
                                                 calibration=anisotropic_batches())
              for allocation in ("uniform", "global", "activation")}
    assert set(shares["uniform"].values()) == {0.3}
    assert shares["activation"] != shares["uniform"]
    assert shares["activation"] != shares["global"]
    # q, k and v read the normalised input, which spans few directions: their output error stays
    # small at a low rank, so they give up budget they hold under the weights' spectra alone
    for name in ("q", "k", "v"):
        assert shares["activation"][name] < shares["global"][name] / 2
    # and the whole set still costs the budget
    dense = {name: m.in_features * m.out_features for name, m in block().named_modules()
             if type(m) is nn.Linear}
    spent = sum(shares["activation"][name] * dense[name] for name in dense) / sum(dense.values())
    assert spent == pytest.approx(0.3, rel=1e-9)

    model = gsmsearch.compress(block(), family="lowrank", budget=0.3, allocation="activation",
                               calibration=anisotropic_batches())
    ranks = {name: m.rank for name, m in model.named_modules() if getattr(m, "family", None) == "lowrank"}
    uniform = gsmsearch.compress(block(), family="lowrank", budget=0.3)
    uniform_ranks = {name: m.rank for name, m in uniform.named_modules() if getattr(m, "family", None) == "lowrank"}
    assert ranks != uniform_ranks


def test_a_layer_given_its_whole_cost_stays_dense():
    # a 64 x 4 input projection: rank 4 costs more than dense, so global sharing keeps it whole
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64))
    shares = gsmsearch.layer_shares(model, "lowrank", 0.5, allocation="global")
    gsmsearch.compress(model, family="lowrank", budget=0.5, allocation="global")
    assert shares["0"] == 1.0
    assert isinstance(model[0], DenseLinear) and model[2].family == "lowrank"


def test_activation_without_calibration_is_refused():
    with pytest.raises(ValueError, match=r"allocation='activation' needs calibration="):
        gsmsearch.compress(block(), family="lowrank", budget=0.3, allocation="activation")


@pytest.mark.parametrize("kwargs, message", [
    ({"family": "nope", "budget": 0.3}, "unknown structured family 'nope'"),
    ({"family": "lowrank", "budget": 0.0}, r"budget must be a number in \(0, 1\], got 0.0"),
    ({"family": "lowrank", "budget": 0.3, "allocation": "spectral"}, "allocation must be one of"),
    ({"family": "lowrank", "budget": 0.3, "include": "encoder.*"}, "no nn.Linear of the model matches"),
    ({"family": "dense", "budget": 0.3}, "below 1"),
])
def test_compress_refuses_bad_arguments_and_leaves_the_model_dense(kwargs, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        gsmsearch.compress(model, **kwargs)
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))


def test_a_family_that_cannot_meet_the_budget_says_so_and_leaves_the_model_as_it_was():
    model = mlp()
    layers = [model[0], model[2], model[4]]
    with pytest.raises(BudgetTooSmall, match="monarch layer of 128 -> 10"):  # the head; 0 and 2 fit
        gsmsearch.compress(model, family="monarch", budget=0.25)
    assert [model[0], model[2], model[4]] == layers


# -- save / load --------------------------------------------------------------------------------

def test_save_and_load_in_a_fresh_process_give_the_same_outputs(tmp_path):
    model = gsmsearch.compress(block(), family="gblr", budget=0.5)
    x = inputs_of(model)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.eval()(x)
        torch.save(expected, tmp_path / "expected.pt")
    gsmsearch.save(model, tmp_path / "model.safetensors")

    script = textwrap.dedent(f"""
        import json, torch
        import gsmsearch
        from tests.test_api import Block
        model = gsmsearch.load({str(tmp_path / 'model.safetensors')!r}, Block)
        deployed = gsmsearch.load({str(tmp_path / 'model.safetensors')!r}, Block(), export=True)
        x = torch.load({str(tmp_path / 'x.pt')!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            same = bool(torch.equal(model(x), expected))
            close = float((deployed(x) - expected).abs().max())
        print("RESULT " + json.dumps({{"same": same, "exported_diff": close, "training": model.training,
                                       "families": sorted({{m.family for m in model.modules()
                                                           if hasattr(m, "family")}})}}))
    """)
    result = fresh_python(script)
    assert result["same"] is True
    assert result["exported_diff"] <= 1e-5
    assert result["training"] is False
    assert result["families"] == ["gblr"]


def test_load_needs_the_architecture_for_a_whole_model(tmp_path):
    gsmsearch.save(gsmsearch.compress(mlp(), family="lowrank", budget=0.5, exclude="4"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="holds a whole model: pass model="):
        gsmsearch.load(tmp_path / "m.safetensors")
    layer = gsmsearch.compress(mlp(), family="lowrank", budget=0.5)[2]
    gsmsearch.save(layer, tmp_path / "layer.safetensors")
    loaded = gsmsearch.load(tmp_path / "layer.safetensors")
    torch.testing.assert_close(loaded.to_dense(), layer.to_dense(), rtol=0, atol=0)


def test_an_exported_model_is_not_saved(tmp_path):
    model = gsmsearch.compress(block(), family="gblr", budget=0.5)
    with pytest.raises(ValueError, match="save the model before export"):
        gsmsearch.save(export(model), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# -- a trial's structure ------------------------------------------------------------------------

def test_a_trial_structure_reapplied_reproduces_its_test_quality(tmp_path):
    from gsmsearch.trainer import TrialConfig, run_trial
    from gsmsearch.workloads import get_workload

    config = TrialConfig(workload="digits-mlp", family="gblr", budget=0.3, mode="finetune", epochs=1)
    path = tmp_path / "trial.safetensors"
    result = run_trial(config, structure_path=path, cache_dir=tmp_path / "cache")

    workload = get_workload(config.workload, **config.workload_options)
    splits = workload.load_data(seed=config.seed)
    model = gsmsearch.apply_structure(workload.build_model(), path)
    assert not model.training
    test = workload.evaluate(export(model), splits.test, device="cpu", collate_fn=splits.collate_fn)
    assert test["quality"] == result.test_quality
    layers = {name: m.structure_summary() for name, m in model.named_modules() if isinstance(m, StructuredLinear)}
    assert layers == result.layers


def test_apply_structure_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such structure file"):
        gsmsearch.apply_structure(mlp(), tmp_path / "absent.safetensors")


# -- launch -------------------------------------------------------------------------------------

TINY = {
    "name": "tiny",
    "storage": "sqlite:///tiny.db",
    "workload": {"name": "digits-mlp", "options": {"hidden_sizes": [32, 32]}, "epochs": 1,
                 "batch_size": 64, "lr": 0.003},
    "families": {"lowrank": {"budget": [0.3]}},
    "trials": 1,
    "concurrency": 1,
    "executor": {"num_cpus": 2},  # the same local Ray as every other test in this process
}


def test_a_bad_dict_is_refused_naming_the_key_and_writes_nothing(tmp_path):
    with pytest.raises(SpecError, match=r"<dict spec>: trials"):
        gsmsearch.launch({**TINY, "trials": "many"}, base_dir=tmp_path)
    with pytest.raises(SpecError, match=r"<dict spec>: .*colour"):
        gsmsearch.launch({**TINY, "colour": "blue"}, base_dir=tmp_path)
    with pytest.raises(TypeError, match="spec must be a spec file path, a dict or a StudySpec, got list"):
        gsmsearch.launch([TINY], base_dir=tmp_path)
    (tmp_path / "study.yaml").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match="base_dir applies to a dict or a StudySpec"):
        gsmsearch.launch(tmp_path / "study.yaml", base_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["study.yaml"]


def test_a_dict_spec_checks_its_workdir_against_base_dir(tmp_path):
    with pytest.raises(SpecError, match="<dict spec>: workdir: /etc is inside /etc, a system folder"):
        gsmsearch.launch({**TINY, "workdir": "/etc"}, base_dir=tmp_path)
    with pytest.raises(SpecError, match="base_dir .*: not a folder"):
        gsmsearch.launch(TINY, base_dir=tmp_path / "absent")


def test_a_dry_run_of_a_dict_writes_nothing(tmp_path, capsys):
    import io

    out = io.StringIO()
    gsmsearch.launch(TINY, base_dir=tmp_path, dry_run=True, out=out)
    assert "<dict spec>: valid" in out.getvalue()
    assert f"workdir: {tmp_path.resolve() / '.gsmsearch' / 'tiny'}" in out.getvalue()
    assert list(tmp_path.iterdir()) == []


def test_a_study_launched_from_a_dict_runs_and_its_trials_structure_applies(tmp_path):
    import io

    from gsmsearch.search import spec_from_dict
    from gsmsearch.workloads import get_workload

    spec = spec_from_dict(TINY)
    summary = gsmsearch.launch(spec, base_dir=tmp_path, out=io.StringIO(), status_interval=1e9)
    assert summary.completed == 1
    assert (tmp_path / "tiny.db").is_file()  # relative storage: under base_dir
    storage = f"sqlite:///{tmp_path / 'tiny.db'}"
    path = gsmsearch.structure_file((storage, "tiny", 0))
    assert path == tmp_path.resolve() / ".gsmsearch" / "tiny" / "structures" / "trial-0.safetensors"

    import optuna

    trial = optuna.load_study(study_name="tiny", storage=storage).trials[0]
    workload = get_workload("digits-mlp", hidden_sizes=[32, 32])
    splits = workload.load_data(seed=0)
    model = gsmsearch.apply_structure(workload.build_model(), (storage, "tiny", 0))
    test = workload.evaluate(export(model), splits.test, device="cpu", collate_fn=splits.collate_fn)
    assert test["quality"] == trial.user_attrs["result"]["test_quality"]
    with pytest.raises(ValueError, match="study 'tiny' has no trial 7"):
        gsmsearch.apply_structure(workload.build_model(), (storage, "tiny", 7))
    # a file another trial wrote, in its place, is refused
    other = gsmsearch.compress(workload.build_model(), family="lowrank", budget=0.5, include="layers.*")
    from gsmsearch.structured import save_structure

    config = {**trial.user_attrs["config"], "budget": 0.5}
    save_structure(other, path, extra_metadata={"config": config})
    with pytest.raises(ValueError, match="was not written by trial 0 of study 'tiny'"):
        gsmsearch.apply_structure(workload.build_model(), (storage, "tiny", 0))


def test_a_dict_names_a_workload_file_relative_to_base_dir(tmp_path):
    import io
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "own_model"
    spec = {**TINY, "workload": {"name": "my_workload.py:TumourClassifier", "epochs": 1},
            "workdir": str(tmp_path / "work")}
    out = io.StringIO()
    gsmsearch.launch(spec, base_dir=folder, dry_run=True, out=out)
    assert "<dict spec>: valid" in out.getvalue()
    with pytest.raises(SpecError, match="<dict spec>: workload.name"):
        gsmsearch.launch(spec, base_dir=tmp_path, dry_run=True, out=out)
    assert list(tmp_path.iterdir()) == []
