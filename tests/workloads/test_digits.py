"""The digits-mlp dense baseline reaches its accuracy target with the workload's defaults."""
from __future__ import annotations

import torch

from gsmsearch.workloads import get_workload


def test_dense_digits_mlp_reaches_097_test_accuracy():
    workload = get_workload("digits-mlp")
    splits = workload.load_data(seed=0)
    torch.manual_seed(0)
    model = workload.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=workload.default_lr)
    for epoch in range(workload.default_epochs):
        for batch in splits.loader("train", workload.default_batch_size, shuffle=True, seed=epoch):
            loss = workload.loss(workload.forward(model, batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    metrics = workload.evaluate(model, splits.test)
    assert metrics["quality"] == metrics["accuracy"] >= 0.97


def test_digits_splits_are_stratified_and_standardised():
    splits = get_workload("digits-mlp").load_data(seed=0)
    assert splits.sizes() == {"train": 1078, "val": 359, "test": 360}
    train_x, train_y = splits.train.tensors
    assert torch.allclose(train_x.mean(dim=0), torch.zeros(64), atol=1e-5)
    assert set(torch.bincount(splits.test.tensors[1]).tolist()) <= {35, 36, 37}


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits

    from gsmsearch.workloads._digits import read_digits

    data, target = read_digits()
    reference = load_digits()
    assert np.array_equal(data, reference.data) and data.dtype == reference.data.dtype
    assert np.array_equal(target, reference.target)
    assert np.array_equal(data.reshape(-1, 8, 8), reference.images)
    # a fresh process loading the digits splits never imports scikit-learn (1.6 s per worker)
    code = ("import sys; from gsmsearch.workloads import get_workload; "
            "get_workload('digits-vit').load_data(seed=0); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
