"""The trainer's CPU AdamW is torch.optim.AdamW's update bit for bit, reads and writes torch's
checkpoint layout, and spares a fresh process the import of torch._dynamo (its reason to exist:
1.0-1.4 s of every Ray worker's first trial)."""

import pytest
import torch

from gsmsearch.structured import GBLRLinear, param_groups
from gsmsearch.trainer._optimizer import CPUAdamW, adamw
from tests.fresh_process import fresh_python


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(GBLRLinear(12, 10, sigma=2.0), torch.nn.ReLU(), torch.nn.Linear(10, 4))


def _groups(model):
    # the trainer's groups: content (weight decay) and structure (betas (0, 0.999), no decay)
    return param_groups(model, lr=3e-3, structure_lr=1e-2, weight_decay=0.05)


def _step_both(models, optimizers, step, generator):
    """The same gradients (a real backward, one parameter without a gradient on odd steps) and
    a scheduled lr on both."""
    x = torch.randn(16, 12, generator=generator)
    for model, optimizer in zip(models, optimizers):
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("base", group["lr"]) * (1.0 - step / 40)
        optimizer.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        if step % 2:
            model[2].bias.grad = None
        optimizer.step()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cpu_adamw_is_torch_adamw_bit_for_bit():
    ours_model, torch_model = _model(), _model()
    ours, theirs = CPUAdamW(_groups(ours_model)), torch.optim.AdamW(_groups(torch_model))
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        _step_both((ours_model, torch_model), (ours, theirs), step, g)
        assert _same(ours_model, torch_model), step
    mine, torchs = ours.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for key, values in torchs["state"].items():
        for name, value in values.items():
            assert torch.equal(mine["state"][key][name], value) and mine["state"][key][name].dtype == value.dtype
    assert not _same(ours_model, _model())  # the steps did move the parameters


@pytest.mark.parametrize("direction", ["ours -> torch", "torch -> ours"])
def test_checkpoints_load_across_both(direction):
    """A checkpoint of either optimizer resumes in the other and both continue identically."""
    first, second = (CPUAdamW, torch.optim.AdamW) if direction == "ours -> torch" else (torch.optim.AdamW, CPUAdamW)
    model = _model()
    optimizer = first(_groups(model))
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        _step_both((model,), (optimizer,), step, g)
    saved = torch.load(_roundtrip({"model": model.state_dict(), "opt": optimizer.state_dict()}), weights_only=False)
    resumed_model = _model(seed=9)
    resumed_model.load_state_dict(saved["model"])
    resumed = second(_groups(resumed_model))
    resumed.load_state_dict(saved["opt"])
    for step in range(5, 12):
        state = g.get_state()
        _step_both((model,), (optimizer,), step, g)
        g.set_state(state)
        _step_both((resumed_model,), (resumed,), step, g)
        assert _same(model, resumed_model), step


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_adamw_picks_torch_where_ours_does_not_run():
    model = _model()
    assert isinstance(adamw(_groups(model), device="cpu"), CPUAdamW)
    assert isinstance(adamw(_groups(model), device="cuda"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="amsgrad"):
        CPUAdamW(_groups(model), amsgrad=True)


def test_a_trial_in_a_fresh_process_does_not_import_dynamo(tmp_path):
    """What the class is for: a whole trial (data, model, training with the proximal step,
    evaluation) without torch._dynamo in the process."""
    script = (
        "import json, sys\n"
        "from gsmsearch.trainer import TrialConfig, run_trial\n"
        "config = TrialConfig(workload='digits-mlp', workload_options={'hidden_sizes': [32, 32]}, family='gblr',\n"
        "                     budget=0.3, mode='scratch', epochs=6, batch_size=32, measure_latency=False)\n"
        f"result = run_trial(config, cache_dir={str(tmp_path)!r})\n"
        "print('RESULT ' + json.dumps({'dynamo': 'torch._dynamo' in sys.modules,\n"
        "                              'quality': result.quality}))\n"
    )
    result = fresh_python(script)
    assert result["quality"] > 0.2  # it trained
    assert result["dynamo"] is False
