"""A workload of your own: your model, your data, your metric -- in one file.

The model is a plain ``nn.Module`` with ``nn.Linear`` layers; gsmsearch swaps the layers that
``candidate_patterns`` (or the spec's ``workload.include``) name for structured ones.  The data is
scikit-learn's bundled breast-cancer table (569 samples, 30 features, 2 classes; read offline).
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gsmsearch.workloads import DataSplits, Workload


class ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):  # x: (batch, width)
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TabularResNet(nn.Module):
    def __init__(self, features: int, width: int, depth: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(features, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, 2 * width) for _ in range(depth)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):  # x: (batch, features) -> (batch, classes)
        return self.head(self.blocks(self.stem(x)))


class TumourClassifier(Workload):
    """Benign or malignant, from 30 measurements of a cell nucleus image."""

    # the layers to structure: the residual blocks' linear layers (not the stem or the head)
    candidate_patterns = ("blocks.*.fc1", "blocks.*.fc2")
    default_epochs = 20  # the dense pre-training of fine-tune studies
    default_batch_size = 32
    default_lr = 3e-3

    def __init__(self, *, width: int = 64, depth: int = 2) -> None:
        # options come from the spec's workload.options; a ValueError names the bad one
        if not isinstance(width, int) or width < 4:
            raise ValueError(f"width must be an integer >= 4, got {width!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        self.width, self.depth = width, depth
        self._options = {"width": width, "depth": depth}  # recorded with every trial

    def load_data(self, seed: int = 0) -> DataSplits:
        from sklearn.datasets import load_breast_cancer

        features, labels = load_breast_cancer(return_X_y=True)
        inputs = torch.tensor(features, dtype=torch.float32)
        inputs = (inputs - inputs.mean(0)) / inputs.std(0)  # standardised features
        targets = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
        train, val, test = order[:341], order[341:455], order[455:]  # 60% / 20% / 20%
        return DataSplits(*(TensorDataset(inputs[part], targets[part]) for part in (train, val, test)))

    def example_batch(self, batch_size: int = 2, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch_size, 30, generator=generator),
                torch.randint(0, 2, (batch_size,), generator=generator))

    def build_model(self) -> nn.Module:
        return TabularResNet(features=30, width=self.width, depth=self.depth, classes=2)

    # forward (model(batch[0])), loss (cross-entropy) and evaluate (accuracy as "quality") are
    # the Workload defaults for classification
