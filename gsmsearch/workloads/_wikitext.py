"""``gpt2-wikitext``: GPT-2 language modelling on WikiText-style token files (paper scale).

``data_dir`` holds ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens`` (the
WikiText-103/-2 raw layout); ``checkpoint_dir`` is a local Hugging Face GPT-2 folder with
``config.json``, ``model.safetensors`` and ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``).
Each file is tokenised whole and cut into non-overlapping blocks of ``context_length`` tokens;
the splits are the three files (the seed does not change them): WikiText-103 and WikiText-2 share
their validation (217,646 words, 60 articles) and test (245,569 words, 60 articles) sets, no
article in two files.  A trial's ``quality`` is measured on ``wiki.valid.tokens``; the test file
is only recorded.

Metrics: ``perplexity`` = exp(mean next-token NLL over every predicted token), ``loss`` = that
mean NLL, and ``quality`` = ``-perplexity`` (higher is better, as every workload's quality).
The model is ``transformers``' own ``GPT2LMHeadModel`` loaded from the folder as it is (extra
``gsmsearch[hf]``), with its ``Conv1D`` layers as ``nn.Linear`` (:func:`._hf.conv1d_to_linear`),
so any GPT-2 checkpoint in Hugging Face layout, the user's own fine-tuned one included, loads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Union

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ._hf import checkpoint_fingerprint, load_model, rebuild_linears, require
from ._registry import (
    MissingFiles,
    DataSplits, Workload, attention_flops, check_positive_int, move_to_device, record_options,
    register_workload,
)

__all__ = ["GPT2WikiText", "load_gpt2_tokenizer"]

SPLIT_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def load_gpt2_tokenizer(checkpoint_dir: Union[str, Path]):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, or byte-level BPE from vocab + merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    vocab, merges = checkpoint_dir / "vocab.json", checkpoint_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise MissingFiles(f"checkpoint_dir {str(checkpoint_dir)!r} has no tokenizer.json nor vocab.json + merges.txt")


@register_workload("gpt2-wikitext")
class GPT2WikiText(Workload):
    candidate_patterns = (
        "transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj",
        "transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj",
    )
    default_epochs = 1
    default_batch_size = 8
    calibration_samples = 32  # up to 1024 tokens each: at most 32k rows per layer
    default_lr = 1e-4
    pretrained = True  # build_model() loads the local GPT-2 checkpoint

    def __init__(
        self,
        *,
        data_dir: Union[str, Path],
        checkpoint_dir: Union[str, Path],
        context_length: int = 1024,
    ) -> None:
        self.data_dir = Path(data_dir)
        for name in SPLIT_FILES:
            if not (self.data_dir / name).is_file():
                raise MissingFiles(f"data_dir {str(self.data_dir)!r} lacks {name}")
        self.checkpoint_dir = Path(checkpoint_dir)
        if not (self.checkpoint_dir / "config.json").is_file() or not (self.checkpoint_dir / "model.safetensors").is_file():
            raise MissingFiles(f"checkpoint_dir {str(self.checkpoint_dir)!r} must hold config.json and model.safetensors")
        transformers = require("transformers", "gpt2-wikitext")
        model_type = json.loads((self.checkpoint_dir / "config.json").read_text()).get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"checkpoint_dir {str(self.checkpoint_dir)!r} holds a {model_type!r} model, not GPT-2 "
                             f"(other causal language models: the workload hf-causal-lm)")
        self.config = transformers.GPT2Config.from_pretrained(str(self.checkpoint_dir), local_files_only=True)
        self.context_length = check_positive_int("context_length", context_length)
        if self.context_length > self.config.n_positions:
            raise ValueError(f"context_length {context_length} exceeds the model's n_positions={self.config.n_positions}")
        record_options(
            self,
            {"data_dir": str(self.data_dir), "checkpoint_dir": str(self.checkpoint_dir),
             "context_length": self.context_length, "checkpoint": checkpoint_fingerprint(self.checkpoint_dir)},
        )

    def load_data(self, seed: int = 0) -> DataSplits:
        tokenizer = load_gpt2_tokenizer(self.checkpoint_dir)
        datasets = []
        for name in SPLIT_FILES:
            text = (self.data_dir / name).read_text(encoding="utf-8")
            ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
            blocks = len(ids) // self.context_length
            if blocks == 0:
                raise ValueError(f"{self.data_dir / name}: fewer than context_length={self.context_length} tokens")
            datasets.append(TensorDataset(ids[: blocks * self.context_length].view(blocks, self.context_length)))
        return DataSplits(*datasets)

    def example_batch(self, batch_size: int = 2, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.config.vocab_size, (batch_size, self.context_length), generator=generator),)

    def build_model(self, linear_factory=None) -> nn.Module:
        model = load_model("GPT2LMHeadModel", self.checkpoint_dir, self.config)
        if linear_factory is not None:
            rebuild_linears(model, self.candidate_patterns, linear_factory)
        return model

    def forward(self, model, batch):
        return model(input_ids=batch[0]).logits  # (B, T, vocab)

    def loss(self, model_output, batch):
        # predict token t+1 from tokens <= t
        logits = model_output[:, :-1]  # (B, T-1, vocab)
        targets = batch[0][:, 1:]  # (B, T-1)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def evaluate(self, model, split, *, batch_size=None, device=None, collate_fn=None):
        loader = self._loader_for_eval(split, batch_size, collate_fn)
        was_training = model.training
        model.eval()
        nll_sum, count = 0.0, 0
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = move_to_device(batch, device)
                    predicted = batch[0][:, 1:].numel()
                    nll_sum += self.loss(self.forward(model, batch), batch).item() * predicted
                    count += predicted
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("cannot evaluate on an empty split")
        loss = nll_sum / count
        perplexity = math.exp(min(loss, 700.0))
        return {"quality": -perplexity, "perplexity": perplexity, "loss": loss}

    @property
    def tokens_per_sample(self) -> int:
        return self.context_length

    def nonlinear_flops_per_sample(self, model) -> int:
        return attention_flops(self.config.n_layer, self.context_length, self.config.n_embd)
