"""Data-parallel trials (``resources.workers_per_trial``): real Ray actors in a placement group,
real torch.distributed (gloo on CPU), a tiny digits workload."""
import os
import signal
import subprocess
import sys

import optuna
import pytest
import torch

from gsmsearch.search import SpecError, spec_from_dict
from gsmsearch.trainer import TrialConfig

from .conftest import TINY_SPEC
from .test_failures import _ray_worker_pids, _trials, _wait

CONFIG = dict(workload="digits-mlp", workload_options={"hidden_sizes": [32, 32]}, family="gblr", budget=0.3,
              epochs=2, batch_size=64, lr=0.003, measure_latency=False)


@pytest.fixture
def local_ray():
    import ray

    from gsmsearch.search._runner import start_ray

    started = not ray.is_initialized()
    start_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_two_worker_trial_keeps_ranks_identical_and_matches_one_worker(local_ray, tmp_path):
    """Two ranks (1 CPU each, one placement group) train one trial: the driver gets one result
    with world_size 2; the parameters of both ranks hash the same after every epoch (bit for bit,
    widths and locations included); a trial stopped by rank 0 after epoch 1 (as the pruner stops
    one) and run again resumes from its checkpoint to the uninterrupted run's parameters, bit for
    bit; and the trained model equals a one-worker run of the same config (same global batch 64,
    same seed, so the same data order) up to float32 summation order."""
    from safetensors.torch import load_file

    from gsmsearch.search._runner import kill_worker, make_worker

    ray = local_ray
    config = TrialConfig(**CONFIG).to_dict()
    cache = str(tmp_path / "cache")
    group = make_worker(2, 0, workers=2)
    try:
        two = ray.get(group.run.remote(config, str(tmp_path / "ck2"), cache, str(tmp_path / "two.safetensors"),
                                       token="t2"), timeout=120)
        # the same trial, held after epoch 1 for a verdict, and stopped there
        held = group.run.remote(config, str(tmp_path / "ck3"), cache, None, token="t3", hold_at=[1],
                                hold_seconds=60.0)
        assert ray.get(group.progress.remote("t3", 60.0), timeout=90)[0]["epoch"] == 1
        assert ray.get(group.stop.remote("t3", "stopped by the test"))
        stopped = ray.get(held, timeout=90)
        resumed = ray.get(group.run.remote(config, str(tmp_path / "ck3"), cache, None, token="t4"), timeout=120)
    finally:
        kill_worker(group)
    assert two["ok"], two
    result = two["result"]
    assert result["world_size"] == 2 and result["epochs_run"] == 2
    assert result["samples_per_second"] > 0
    # every training sample once per epoch, counted over both ranks
    assert [c["samples"] for c in result["curves"]] == [result["curves"][0]["samples"]] * 2
    ranks = two["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert len(ranks[0]["digests"]) == 2
    assert ranks[0]["digests"] == ranks[1]["digests"]  # bit-identical after each epoch
    assert ranks[0]["digests"][0] != ranks[0]["digests"][1]  # (and they did train)

    assert stopped["pruned"] and stopped["epochs"] == 1, stopped
    assert resumed["ok"] and resumed["result"]["world_size"] == 2, resumed
    # it trained epoch 2 only (epoch 1 came from the checkpoint), on both ranks alike, and
    # ended where the uninterrupted run did: resuming replays the same steps on the same state
    assert [r["digests"] for r in resumed["ranks"]] == [ranks[0]["digests"][1:]] * 2
    assert resumed["result"]["quality"] == result["quality"]

    worker = make_worker(1, 0)
    try:
        one = ray.get(worker.run.remote(config, str(tmp_path / "ck1"), cache, str(tmp_path / "one.safetensors"),
                                        token="t1"), timeout=120)
    finally:
        kill_worker(worker)
    assert one["ok"] and one["result"]["world_size"] == 1
    # The two runs take the same steps on the same batches; only the summation order of each
    # gradient differs (two half-batch gradients weighted 1/2 and summed vs one 64-row matmul),
    # about 1e-7 relative per step in float32.  Adam passes such a relative gradient error on
    # to an update of about lr x 1e-7 = 3e-10, so 46 steps drift by well under 1e-6 (measured:
    # 7e-7 largest difference, in a GBLR factor); 1e-5 leaves room for the rounding to grow
    # through the later steps, and is far below what one different batch would move (1e-3).
    losses_two = [c["train_loss"] for c in result["curves"]]
    losses_one = [c["train_loss"] for c in one["result"]["curves"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    a, b = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    assert result["structured_relative_flops"] <= 0.3 + 1e-6  # the budget holds on the DDP run too


def _rank_pids(driver_pid):
    """The driver's TrialWorker processes that run a rank other than 0 (Ray titles a worker
    process by the method it runs)."""
    out = subprocess.run(["pgrep", "-f", "TrialWorker.run_rank"], capture_output=True, text=True)
    found = set(map(int, out.stdout.split()))
    return [pid for pid in _ray_worker_pids(driver_pid) if pid in found]


EPOCHS = 24  # long enough that the kill lands mid-training


def test_a_killed_rank_retries_the_trial_from_its_checkpoint(write_spec, tmp_path):
    """A study whose trial runs on 2 workers: the process of rank 1 is killed once the trial has
    checkpointed an epoch; the driver retries the trial (from that checkpoint) on a new group,
    and it completes with world_size 2."""
    import torch as _torch

    spec = write_spec({"trials": 1, "concurrency": 1,
                       "workload": {**TINY_SPEC["workload"], "epochs": EPOCHS},
                       "families": {"lowrank": {"budget": [0.3]}}, "constraints": [],
                       "resources": {"workers_per_trial": 2, "cpus_per_worker": 1}})
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "2"],
                              stdout=log, stderr=log, start_new_session=True)
    ckpt_root = tmp_path / ".gsmsearch" / "tiny" / "checkpoints"
    try:
        _wait(lambda: list(ckpt_root.glob("*/last.pt")) and _rank_pids(driver.pid), timeout=120)
        (checkpoint,) = list(ckpt_root.glob("*/last.pt"))
        for pid in _rank_pids(driver.pid):
            os.kill(pid, signal.SIGKILL)
        saved = _torch.load(checkpoint, weights_only=False)["curves"]  # what the retry resumes from
        assert driver.wait(180) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = (tmp_path / "driver.log").read_text()
    assert "retrying from its last checkpoint" in text, text[-3000:]
    # the attempt's reason: rank 1's death as rank 0 reports it (or, where Ray is slow to tell,
    # the closed connection rank 0 saw)
    assert "(rank 1 of 2: worker died" in text or "Connection closed by peer" in text, text[-3000:]
    (trial,) = _trials(db)
    assert trial.state == optuna.trial.TrialState.COMPLETE
    result = trial.user_attrs["result"]
    assert result["world_size"] == 2 and result["epochs_run"] == EPOCHS
    curves = trial.user_attrs["curves"]
    assert [c["epoch"] for c in curves] == list(range(1, EPOCHS + 1))
    # the retry resumed from the checkpoint: its first epochs are the killed attempt's, wall
    # times included (epochs trained again would have been timed again)
    assert 1 <= len(saved) < EPOCHS
    assert curves[:len(saved)] == saved


def test_workers_per_trial_in_the_spec():
    """The totals follow the per-worker shares; one worker per trial asks make_worker for no
    more than before; bad values name the field."""
    base = {k: v for k, v in TINY_SPEC.items()}
    spec = spec_from_dict({**base, "resources": {"workers_per_trial": 2, "cpus_per_worker": 1}}, "t")
    r = spec.resources
    assert (r.cpus_per_trial, r.worker_cpus, r.gpus_per_trial, r.placement) == (2.0, 1.0, 0.0, "pack")
    assert r.worker_options() == {"workers": 2, "placement": "pack"}
    spec = spec_from_dict({**base, "resources": {"workers_per_trial": 4, "cpus_per_trial": 2,
                                                  "gpus_per_worker": 1, "placement": "spread"}}, "t")
    r = spec.resources
    assert (r.worker_cpus, r.gpus_per_trial, r.worker_gpus) == (0.5, 4.0, 1.0)
    assert r.worker_options() == {"workers": 4, "placement": "spread"}
    assert spec_from_dict(base, "t").resources.worker_options() == {}
    # the canonical form keeps a one-worker spec's digest
    assert "workers_per_trial" not in str(spec_from_dict(base, "t").canonical())
    for bad, message in [({"workers_per_trial": 0}, "resources.workers_per_trial"),
                         ({"workers_per_trial": 2, "gpus_per_worker": 1, "gpus_per_trial": 1},
                          "gpus_per_trial (1) must be workers_per_trial x gpus_per_worker"),
                         ({"workers_per_trial": 1024, "cpus_per_worker": 8}, "more than a trial may hold"),
                         ({"placement": "strict_pack"}, "resources.placement")]:
        with pytest.raises(SpecError, match=r".*" + message.replace("(", r"\(").replace(")", r"\)")):
            spec_from_dict({**base, "resources": bad}, "t")
