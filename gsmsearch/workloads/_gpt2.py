"""A GPT-2 language model (nanoGPT style) that loads Hugging Face GPT-2 checkpoint folders.

Module names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.wte``, ``transformer.h.N``
with ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), but those four layers are
linear layers built through the linear factory rather than Hugging Face's ``Conv1D`` (which
stores the transposed weight, and which surgery by ``nn.Linear`` would miss); the loader
transposes.  The LM head is tied to the token embedding.  ``transformers`` is not needed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, Union

import torch
from torch import nn

from ._registry import LinearFactory

__all__ = ["GPT2Config", "GPT2LMHeadModel", "load_gpt2", "save_gpt2"]

# Hugging Face stores these as Conv1D weights of shape (in, out)
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024   # longest context
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "GPT2Config":
        raw = json.loads(Path(path).read_text())
        activation = raw.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ValueError(f"{path}: activation_function {activation!r} is not supported (only 'gelu_new')")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in names})

    def to_json_dict(self) -> dict:
        return {**dataclasses.asdict(self), "model_type": "gpt2", "activation_function": "gelu_new"}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, linear_factory: LinearFactory) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = linear_factory(config.n_embd, 3 * config.n_embd, bias=True)
        self.c_proj = linear_factory(config.n_embd, config.n_embd, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)  # each (B, T, width)
        q, k, v = (t.view(batch, tokens, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, hd)
        return self.c_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, linear_factory: LinearFactory) -> None:
        super().__init__()
        self.c_fc = linear_factory(config.n_embd, 4 * config.n_embd, bias=True)
        self.c_proj = linear_factory(4 * config.n_embd, config.n_embd, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, config: GPT2Config, linear_factory: LinearFactory) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, linear_factory)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, linear_factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """``forward(input_ids (B, T)) -> logits (B, T, vocab_size)``."""

    def __init__(self, config: GPT2Config, *, linear_factory: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.transformer.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.transformer.h = nn.ModuleList(Block(config, linear_factory) for _ in range(config.n_layer))
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[1]
        if tokens > self.config.n_positions:
            raise ValueError(f"sequence of {tokens} tokens exceeds n_positions={self.config.n_positions}")
        positions = torch.arange(tokens, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return x @ self.transformer.wte.weight.T  # (B, T, vocab), tied head


def load_gpt2(checkpoint_dir: Union[str, Path], *, linear_factory: LinearFactory = nn.Linear) -> GPT2LMHeadModel:
    """Build from ``config.json`` and load ``model.safetensors`` (Hugging Face GPT-2 layout,
    keys with or without the ``transformer.`` prefix).  Layers the factory did not build as
    ``nn.Linear`` shapes keep their initialisation (initialise them by surgery instead)."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    model = GPT2LMHeadModel(GPT2Config.from_json(checkpoint_dir / "config.json"), linear_factory=linear_factory)
    state: Dict[str, torch.Tensor] = {}
    for key, value in load_file(str(checkpoint_dir / "model.safetensors")).items():
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied head; old causal-mask buffers
        key = key if key.startswith("transformer.") else "transformer." + key
        state[key] = value.T.contiguous() if key.endswith(_CONV1D_WEIGHTS) else value
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if missing:
        raise ValueError(f"{checkpoint_dir}: checkpoint lacks {', '.join(missing[:5])}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    return model


def save_gpt2(model: GPT2LMHeadModel, checkpoint_dir: Union[str, Path]) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the Hugging Face GPT-2 layout."""
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2))
    state = {
        key: (value.T if key.endswith(_CONV1D_WEIGHTS) else value).contiguous()
        for key, value in model.state_dict().items()
    }
    save_file(state, str(checkpoint_dir / "model.safetensors"))
