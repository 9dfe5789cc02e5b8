"""A BERT encoder with sentence-embedding pooling, loadable from a Hugging Face checkpoint folder.

Parameter names follow Hugging Face's ``BertModel`` (``embeddings.*``, ``encoder.layer.N.*``), so a
``model.safetensors`` loads with ``load_state_dict``.  The six linear layers of every encoder layer
(``attention.self.query/key/value``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``) are built through the linear factory.  ``forward`` returns mean-pooled,
L2-normalised sentence embeddings, as sentence-transformers' all-MiniLM-L6-v2 does.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ._registry import LinearFactory

__all__ = ["BertConfig", "BertSentenceEncoder", "load_bert_sentence_encoder"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "BertConfig":
        """Read a Hugging Face ``config.json``, keeping the fields this encoder uses."""
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in names})


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        # token type 0 everywhere (single-sentence inputs)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # (B, T, hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, linear_factory: LinearFactory) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.query = linear_factory(hidden, hidden, bias=True)
        self.key = linear_factory(hidden, hidden, bias=True)
        self.value = linear_factory(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, hidden) -> (B, heads, T, head_dim)
            return t.view(batch, tokens, self.heads, hidden // self.heads).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(
            split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x)),
            attn_mask=attend,  # (B, 1, 1, T) bool: True where the key is a real token
        )
        return out.transpose(1, 2).reshape(batch, tokens, hidden)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, linear_factory: LinearFactory) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(config, linear_factory)
        self.attention.output = nn.Module()
        self.attention.output.dense = linear_factory(hidden, hidden, bias=True)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = linear_factory(hidden, config.intermediate_size, bias=True)
        self.output = nn.Module()
        self.output.dense = linear_factory(config.intermediate_size, hidden, bias=True)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        attn = self.attention
        x = attn.output.LayerNorm(x + attn.output.dense(attn.self(x, attend)))  # post-norm
        inner = nn.functional.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT
        return self.output.LayerNorm(x + self.output.dense(inner))


class BertSentenceEncoder(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T)) -> unit-norm embeddings (B, hidden)``."""

    def __init__(self, config: BertConfig, *, linear_factory: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(config, linear_factory) for _ in range(config.num_hidden_layers)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()  # (B, T)
        x = self.embeddings(input_ids)
        attend = mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        for layer in self.encoder.layer:
            x = layer(x, attend)
        weights = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, hidden)
        return nn.functional.normalize(pooled, dim=-1)


def load_bert_sentence_encoder(
    model_dir: Union[str, Path], *, linear_factory: LinearFactory = nn.Linear
) -> BertSentenceEncoder:
    """Build the encoder from ``model_dir/config.json`` and load ``model_dir/model.safetensors``.

    Every non-candidate weight must load.  Candidate layers get the checkpoint's weights when
    the factory builds modules with ``weight``/``bias`` of the checkpoint's shapes (``nn.Linear``
    does); other (structured) layers keep the factory's initialisation -- initialise those from
    the dense weights by model surgery instead.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    model = BertSentenceEncoder(BertConfig.from_json(model_dir / "config.json"), linear_factory=linear_factory)
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    own = model.state_dict()
    loadable = {
        key: value for key, value in checkpoint.items() if key in own and own[key].shape == value.shape
    }
    missing = [key for key in own if key not in loadable]
    candidate_prefixes = tuple(
        name + "." for name, module in model.named_modules() if _is_candidate(name)
    )
    not_candidates = [key for key in missing if not key.startswith(candidate_prefixes)]
    if not_candidates:
        raise ValueError(f"{model_dir}: checkpoint lacks weights for {', '.join(not_candidates[:5])}")
    model.load_state_dict(loadable, strict=False)
    return model


_CANDIDATE_SUFFIXES = (
    ".attention.self.query", ".attention.self.key", ".attention.self.value",
    ".attention.output.dense", ".intermediate.dense", ".output.dense",
)


def _is_candidate(name: str) -> bool:
    return name.startswith("encoder.layer.") and name.endswith(_CANDIDATE_SUFFIXES)
