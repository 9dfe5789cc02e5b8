"""``hf-sequence-classification`` and ``hf-causal-lm``: Hugging Face ``transformers`` models and
their tokenizer from a local folder, on text data from local files (docs/workloads.md).

The model is ``AutoModelForSequenceClassification`` / ``AutoModelForCausalLM``
``.from_pretrained(model_dir, local_files_only=True)`` in float32 and the tokenizer
``AutoTokenizer.from_pretrained(model_dir)``: nothing is downloaded.  ``transformers`` (and
``datasets`` for a ``save_to_disk`` folder) are the optional extra ``gsmsearch[hf]``, imported
only when such a workload is built; without them the workload's constructor raises
:class:`MissingExtra` naming the extra.

GPT-2's ``Conv1D`` layers (a linear map whose weight is stored transposed, ``(in, out)``) are
converted to ``nn.Linear`` with the transposed weight when the model is built, so the surgery
finds them; the state dict keeps its key names, with those weights transposed.

Data: one table split by the seed (``data`` and ``split``), or ``train_file`` + ``test_file``
(validation drawn from the training rows by the seed: ``validation_fraction``), or all three
files.  A table is a ``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.json`` or ``.parquet`` file, or
a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` folder under ``data`` gives
its ``train``/``validation``/``test`` splits).  No row is in two splits; a trial's ``quality`` is
measured on the validation split and the test split is only recorded.

Quality: accuracy (classification); ``-loss``, the negative mean next-token negative
log-likelihood, i.e. minus the log of the perplexity (causal LM: higher is better, as every
workload's quality; ``perplexity`` is recorded beside it).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ._registry import (
    DataSplits,
    LinearFactory,
    MissingFiles,
    Workload,
    attention_flops,
    check_fractions,
    check_positive_int,
    make_loader,
    move_to_device,
    record_options,
    register_workload,
)
from ._splits import split_indices, stratified_split_indices

__all__ = [
    "MissingExtra",
    "HFSequenceClassification",
    "HFCausalLM",
    "DEFAULT_PATTERNS",
    "conv1d_to_linear",
    "load_model",
    "rebuild_linears",
    "checkpoint_fingerprint",
    "read_table",
    "PadCollate",
]

EXTRA = "hf"

#: Default layers to structure per ``config.model_type`` (fnmatch patterns on qualified names):
#: the attention projections and the MLP of every transformer block; embeddings, poolers and
#: heads stay dense.  Other model types: every ``nn.Linear`` inside a repeated block
#: (:func:`block_linears`).  ``workload.include`` / ``workload.exclude`` in the spec override it.
_BERT = ("*encoder.layer.*.attention.self.query", "*encoder.layer.*.attention.self.key",
         "*encoder.layer.*.attention.self.value", "*encoder.layer.*.attention.output.dense",
         "*encoder.layer.*.intermediate.dense", "*encoder.layer.*.output.dense")
_LLAMA = ("*layers.*.self_attn.q_proj", "*layers.*.self_attn.k_proj", "*layers.*.self_attn.v_proj",
          "*layers.*.self_attn.o_proj", "*layers.*.mlp.gate_proj", "*layers.*.mlp.up_proj",
          "*layers.*.mlp.down_proj")
DEFAULT_PATTERNS: Dict[str, Tuple[str, ...]] = {
    **{kind: _BERT for kind in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": ("*transformer.layer.*.attention.q_lin", "*transformer.layer.*.attention.k_lin",
                   "*transformer.layer.*.attention.v_lin", "*transformer.layer.*.attention.out_lin",
                   "*transformer.layer.*.ffn.lin1", "*transformer.layer.*.ffn.lin2"),
    "gpt2": ("*h.*.attn.c_attn", "*h.*.attn.c_proj", "*h.*.mlp.c_fc", "*h.*.mlp.c_proj"),
    **{kind: _LLAMA for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
}
#: RoBERTa-style position ids start after the padding id: ``pad_token_id + 1`` fewer positions.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                  ".parquet": "parquet", ".pq": "parquet"}
#: Split names of a ``DatasetDict`` folder given as ``data``.
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class MissingExtra(ImportError, ValueError):
    """An optional library a workload needs is not installed; the message names the extra
    (``pip install 'gsmsearch[hf]'``).  A ``ValueError`` too, so a spec naming the workload is
    refused with it (``workload.options: ...``)."""


def require(module: str, what: str):
    """``import module``, or :class:`MissingExtra` saying ``what`` needs it and which extra has it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(
            f"{what} needs the {module!r} library, which cannot be imported ({error}); "
            f"install the extra: pip install 'gsmsearch[{EXTRA}]'", name=module) from error


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' info/warnings (load reports) and progress bars off, put back after."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# -- layers ---------------------------------------------------------------------------------
def conv1d_to_linear(model: nn.Module) -> List[str]:
    """Replace every ``transformers`` ``Conv1D`` (``y = x W + b``, ``W`` of shape (in, out)) in
    ``model`` by the ``nn.Linear`` computing the same map (weight ``W^T``), in place; returns the
    replaced names."""
    from transformers.pytorch_utils import Conv1D

    from ..structured import set_module

    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        weight = module.weight  # (in, out)
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.train(module.training)
        set_module(model, name, linear)
        replaced.append(name)
    return replaced


def load_model(auto_class: str, model_dir: Path, config, load_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(model_dir)`` in float32, nothing downloaded, with
    ``Conv1D`` layers as ``nn.Linear`` (:func:`conv1d_to_linear`); on the meta device (a spec's
    checks) built from ``config`` alone, no weights read."""
    transformers = importlib.import_module("transformers")
    auto = getattr(transformers, auto_class)
    with _quiet(transformers):
        if torch.get_default_device().type == "meta":
            model = auto.from_config(config, dtype=torch.float32)
        else:
            model = auto.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32,
                                         **(load_kwargs or {}))
    conv1d_to_linear(model)
    return model


def rebuild_linears(model: nn.Module, patterns: Sequence[str], linear_factory: LinearFactory) -> None:
    """Rebuild each ``nn.Linear`` matching ``patterns`` with ``linear_factory``, in place, copying the
    checkpoint's weights where the new layer has an ``nn.Linear``-shaped weight (as the built-ins do)."""
    from ..structured import matching_linears, set_module

    for name, linear in matching_linears(model, list(patterns), ()):
        layer = linear_factory(linear.in_features, linear.out_features, bias=linear.bias is not None)
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        with torch.no_grad():
            if isinstance(weight, torch.Tensor) and weight.shape == linear.weight.shape:
                weight.copy_(linear.weight)
                if isinstance(bias, torch.Tensor) and linear.bias is not None and bias.shape == linear.bias.shape:
                    bias.copy_(linear.bias)
        set_module(model, name, layer)


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Of a checkpoint folder's files (config, weights: name, size, modification time): keys the
    dense-model cache, so a checkpoint written again at the same path is not confused with the old one."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


def block_linears(model: nn.Module) -> Tuple[str, ...]:
    """Names of the ``nn.Linear`` layers inside a repeated block: those with a numeric part in
    their qualified name (``encoder.layers.3.fc1``), so embeddings, poolers and heads are left."""
    return tuple(name for name, module in model.named_modules()
                 if type(module) is nn.Linear and _BLOCK_INDEX.search(name))


# -- data -----------------------------------------------------------------------------------
def _table_kind(path: Path, option: str) -> str:
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        if path.exists() and not path.is_file():
            raise ValueError(f"{option}: {str(path)!r} is a folder, not a {path.suffix} file")
        return kind
    if path.is_dir():
        return "datasets"
    if not path.exists():
        raise MissingFiles(f"{option}: {str(path)!r} does not exist")
    raise ValueError(f"{option}: {str(path)!r} is not a table: expected a "
                     f"{', '.join(sorted(TABLE_SUFFIXES))} file or a datasets save_to_disk folder")


def _load_from_disk(path: Path, option: str):
    datasets = require("datasets", f"{option} {str(path)!r} (a datasets save_to_disk folder)")
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"{option}: {str(path)!r} is not a datasets save_to_disk folder ({error})") from None


def read_table(path: Union[str, Path], option: str):
    """The rows of ``path`` as a pandas DataFrame (a ``DatasetDict`` folder: a dict of split name
    -> DataFrame).  CSV/TSV fields are read as written (no text is taken for a missing value)."""
    import pandas as pd

    path = Path(path)
    kind = _table_kind(path, option)
    if not path.exists():
        raise MissingFiles(f"{option}: {str(path)!r} does not exist")
    try:
        if kind in ("csv", "tsv"):
            return pd.read_csv(path, sep="," if kind == "csv" else "\t", keep_default_na=False)
        if kind in ("jsonl", "json"):
            return pd.read_json(path, lines=kind == "jsonl", dtype=False)
        if kind == "parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"{option}: cannot read {str(path)!r} as {kind}: {error}") from None
    loaded = _load_from_disk(path, option)
    if hasattr(loaded, "to_pandas"):
        return loaded.to_pandas()
    return {name: split.to_pandas() for name, split in loaded.items()}


def table_columns(path: Union[str, Path], option: str) -> Dict[str, List[str]]:
    """Column names of ``path`` without reading its rows: ``{"": [...]}``, or per split of a
    ``DatasetDict`` folder."""
    path = Path(path)
    kind = _table_kind(path, option)
    if not path.exists():
        raise MissingFiles(f"{option}: {str(path)!r} does not exist")
    try:
        if kind in ("csv", "tsv"):
            import pandas as pd

            return {"": [str(c) for c in pd.read_csv(path, sep="," if kind == "csv" else "\t", nrows=0).columns]}
        if kind == "jsonl":
            with open(path, encoding="utf-8") as handle:
                first = next((line for line in handle if line.strip()), None)
            if first is None:
                raise ValueError("the file has no rows")
            row = json.loads(first)
            if not isinstance(row, dict):
                raise ValueError("its first line is not a JSON object")
            return {"": list(row)}
        if kind == "parquet":
            import pyarrow.parquet as pq

            return {"": list(pq.read_schema(path).names)}
    except (ValueError, OSError) as error:
        raise ValueError(f"{option}: cannot read {str(path)!r} as {kind}: {error}") from None
    if kind == "json":
        return {"": [str(c) for c in read_table(path, option).columns]}
    loaded = _load_from_disk(path, option)
    if hasattr(loaded, "column_names") and isinstance(loaded.column_names, list):
        return {"": list(loaded.column_names)}
    return {name: list(columns) for name, columns in loaded.column_names.items()}


def _dict_split(names: Sequence[str], wanted: Sequence[str]) -> Optional[str]:
    return next((name for name in wanted if name in names), None)


def _label_text(value: Any) -> str:
    """How a label value is matched against the ``labels`` option (1.0 and 1 alike)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value)


class TokenDataset(Dataset):
    """Tokenised rows: items are dicts of token-id lists (``input_ids``, ``attention_mask``, maybe
    ``token_type_ids``) and, for classification, an int ``labels``."""

    def __init__(self, encodings: Dict[str, List[List[int]]], labels: Optional[Sequence[int]] = None) -> None:
        self.encodings = encodings
        self.labels = None if labels is None else [int(v) for v in labels]
        lengths = {len(v) for v in encodings.values()} | ({len(self.labels)} if self.labels is not None else set())
        if len(lengths) != 1:
            raise ValueError("token lists and labels differ in length")

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item: Dict[str, Any] = {key: values[index] for key, values in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


class PadCollate:
    """A batch of :class:`TokenDataset` items: token lists right-padded to the batch's longest
    (``input_ids`` with ``pad_id``, the others with 0), ``labels`` stacked."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        batch: Dict[str, torch.Tensor] = {}
        for key in MODEL_INPUTS:
            if key not in items[0]:
                continue
            tensor = torch.full((len(items), longest), self.pad_id if key == "input_ids" else 0,
                                dtype=torch.long)  # (B, T)
            for row, item in enumerate(items):
                tensor[row, : len(item[key])] = torch.as_tensor(item[key], dtype=torch.long)
            batch[key] = tensor
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)  # (B,)
        return batch


# -- the workloads --------------------------------------------------------------------------
class _HFWorkload(Workload):
    """What both adapters share: the model folder, the data options and splits, tokenising."""

    auto_class = ""  # the transformers Auto class
    task = ""  # words for messages
    mapping_names = ""  # transformers.models.auto.modeling_auto's model_type -> class table
    default_epochs = 3
    default_batch_size = 16
    default_lr = 5e-5
    default_weight_decay = 0.01
    calibration_samples = 256
    pretrained = True
    _forward_kwargs: Dict[str, Any] = {}

    def __init__(self, *, model_dir, data, train_file, validation_file, test_file, text_column,
                 max_length, split, validation_fraction) -> None:
        for option, value in (("model_dir", model_dir), ("data", data), ("train_file", train_file),
                              ("validation_file", validation_file), ("test_file", test_file)):
            if value is not None and not isinstance(value, (str, Path)):
                raise ValueError(f"{option} must be a path, got {value!r}")
        if model_dir is None:
            raise ValueError("model_dir is required: the folder of the model's config.json, weights and tokenizer")
        if not isinstance(text_column, str) or not text_column:
            raise ValueError(f"text_column must be a column name, got {text_column!r}")
        self.max_length = check_positive_int("max_length", max_length)
        if data is None and train_file is None:
            raise ValueError("give the data: data (one table, split by the seed) or train_file with test_file "
                             "(and validation_file, or validation_fraction of the training rows)")
        if data is not None:
            for option, value in (("train_file", train_file), ("validation_file", validation_file),
                                  ("test_file", test_file)):
                if value is not None:
                    raise ValueError(f"{option} and data exclude each other: data is one table split by the seed")
        elif test_file is None:
            raise ValueError("test_file is required with train_file (the test split is never drawn from training rows)")
        elif split is not None:
            raise ValueError("split applies to data (one table); with train_file and test_file, validation_fraction "
                             "sets the validation rows drawn from train_file")
        if split is not None:
            split = check_fractions("split", split)
        if validation_fraction is not None:
            if validation_file is not None:
                raise ValueError("validation_fraction and validation_file exclude each other")
            if (isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float))
                    or not 0 < validation_fraction < 1):
                raise ValueError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}")
        self.text_column = text_column
        self.split = split
        self.validation_fraction = validation_fraction
        self.model_dir = Path(model_dir)
        self.data = None if data is None else Path(data)
        self.files = {name: None if value is None else Path(value) for name, value in
                      (("train_file", train_file), ("validation_file", validation_file), ("test_file", test_file))}

        require("transformers", f"workload {self.name!r}")
        if not (self.model_dir / "config.json").is_file():
            raise MissingFiles(f"model_dir {str(self.model_dir)!r} has no config.json")
        self.config = self._load_config()
        self.model_type = str(self.config.model_type)
        self.tokenizer = self._load_tokenizer()
        self.pad_id = self._pad_id()
        self._check_data_columns()

    # -- model folder ---------------------------------------------------------------------
    @property
    def transformers(self):
        """The ``transformers`` module (imported lazily; its presence is checked on construction)."""
        return importlib.import_module("transformers")

    def _load_config(self):
        from transformers.models.auto import modeling_auto

        try:
            with _quiet(self.transformers):
                config = self.transformers.AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        except (ValueError, OSError, KeyError) as error:
            raise ValueError(f"model_dir {str(self.model_dir)!r}: transformers cannot read its config.json "
                             f"({_first_line(error)}); models with custom code (trust_remote_code) are not run") from None
        supported = getattr(modeling_auto, self.mapping_names)
        if config.model_type not in supported:
            raise ValueError(f"model_dir {str(self.model_dir)!r}: transformers has no {self.task} model for "
                             f"model_type {config.model_type!r}")
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            if config.model_type in _OFFSET_POSITIONS and isinstance(config.pad_token_id, int):
                positions -= config.pad_token_id + 1
            if self.max_length > positions:
                raise ValueError(f"max_length {self.max_length} exceeds the {positions} positions of the model "
                                 f"in model_dir {str(self.model_dir)!r}")
        return config

    def _load_tokenizer(self):
        try:
            with _quiet(self.transformers):
                tokenizer = self.transformers.AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise ValueError(f"model_dir {str(self.model_dir)!r}: no tokenizer transformers can load there "
                             f"(tokenizer.json, or the model's vocabulary files): {_first_line(error)}") from None
        vocab = getattr(self.config, "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise ValueError(f"model_dir {str(self.model_dir)!r}: its tokenizer has {len(tokenizer)} tokens, more "
                             f"than the model's vocab_size {vocab}")
        return tokenizer

    def _pad_id(self) -> int:
        """The id batches are padded with: the model's ``pad_token_id``, else the tokenizer's pad
        or end-of-sequence token, else 0 (padding is masked by ``attention_mask`` either way)."""
        for candidate in (getattr(self.config, "pad_token_id", None), self.tokenizer.pad_token_id,
                          self.tokenizer.eos_token_id):
            if isinstance(candidate, int) and candidate >= 0:
                return candidate
        return 0

    def _fingerprint(self) -> str:
        return checkpoint_fingerprint(self.model_dir)

    def _load_kwargs(self) -> Dict[str, Any]:
        return {}

    def _model_config(self):
        config = copy.deepcopy(self.config)
        for key, value in self._load_kwargs().items():
            if key != "ignore_mismatched_sizes":
                setattr(config, key, value)
        return config

    def build_model(self, linear_factory: Optional[LinearFactory] = None) -> nn.Module:
        """The model from ``model_dir`` in float32 (``Conv1D`` layers as ``nn.Linear``); on the
        meta device (a spec's checks) built from the config alone, no weights read.  With
        ``linear_factory``, each candidate layer is then rebuilt by it, with the checkpoint's
        weights where the new layer has an ``nn.Linear``-shaped weight (as the built-ins do)."""
        model = load_model(self.auto_class, self.model_dir, self._model_config(), self._load_kwargs())
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.pad_id  # GPT-2/Llama classification finds the last token by it
        if linear_factory is not None:
            rebuild_linears(model, self.candidate_patterns, linear_factory)
        return model

    @property
    def candidate_patterns(self) -> Tuple[str, ...]:  # type: ignore[override]
        """:data:`DEFAULT_PATTERNS` of the model type; else the block layers of the model (built
        on the meta device once)."""
        if self.model_type in DEFAULT_PATTERNS:
            return DEFAULT_PATTERNS[self.model_type]
        if getattr(self, "_block_linears", None) is None:
            with torch.device("meta"):
                self._block_linears = block_linears(self.build_model())
        return self._block_linears

    def _input_names(self) -> Tuple[str, ...]:
        """What a batch gives the model: ``input_ids``, ``attention_mask``, and ``token_type_ids``
        where the tokenizer makes them and the model has token types (BERT's sentence pairs)."""
        names = ("input_ids", "attention_mask")
        if ("token_type_ids" in (getattr(self.tokenizer, "model_input_names", None) or ())
                and int(getattr(self.config, "type_vocab_size", 0) or 0) > 1):
            names += ("token_type_ids",)
        return names

    def forward(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        return model(**inputs, **self._forward_kwargs).logits

    # -- data -----------------------------------------------------------------------------
    def _check_data_columns(self) -> None:
        sources = [("data", self.data)] if self.data is not None else [
            (option, path) for option, path in self.files.items() if path is not None]
        for option, path in sources:
            columns = table_columns(path, option)
            if option == "data" and set(columns) != {""}:
                self._check_dataset_dict(path, list(columns))
            elif option == "data" and self.validation_fraction is not None:
                raise ValueError(f"validation_fraction applies to train_file with test_file (or a DatasetDict "
                                 f"without a validation split); data {str(path)!r} is one table, split by split")
            for split_name, names in columns.items():
                where = str(path) + (f" (split {split_name!r})" if split_name else "")
                for column_option, column in self._columns():
                    if column not in names:
                        raise ValueError(f"{column_option}: {column!r} is not a column of {where}; its columns: "
                                         f"{', '.join(names) or 'none'}")

    def _check_dataset_dict(self, path: Path, names: List[str]) -> None:
        if "train" not in names or "test" not in names:
            raise ValueError(f"data: the DatasetDict in {str(path)!r} has splits {', '.join(names)}; "
                             f"it needs 'train' and 'test' (and may have 'validation')")
        if self.split is not None:
            raise ValueError(f"split applies to one table; data {str(path)!r} holds its own splits "
                             f"(validation_fraction draws validation rows from 'train' where it has none)")
        if _dict_split(names, VALIDATION_NAMES) is not None and self.validation_fraction is not None:
            raise ValueError(f"validation_fraction: the DatasetDict in {str(path)!r} has a validation split")

    def _columns(self) -> List[Tuple[str, str]]:
        """(option, column name) of every column the workload reads."""
        return [("text_column", self.text_column)]

    def _strata(self, frame) -> Optional[np.ndarray]:
        """Per-row classes to stratify the seed's splits by (None: a plain random split)."""
        return None

    def _partition(self, n: int, fractions: Sequence[float], seed: int, frame):
        strata = self._strata(frame)
        if strata is None:
            return split_indices(n, fractions, seed)
        return stratified_split_indices(strata, fractions, seed)

    def split_frames(self, seed: int = 0):
        """(train, validation, test) DataFrames: the files as they are, or the rows drawn by ``seed``."""
        if self.data is not None:
            loaded = read_table(self.data, "data")
            if isinstance(loaded, dict):
                self._check_dataset_dict(self.data, list(loaded))
                val_name = _dict_split(list(loaded), VALIDATION_NAMES)
                train, val, test = loaded["train"], loaded.get(val_name), loaded["test"]
                where = {"train": f"{self.data} (train)", "val": f"{self.data} ({val_name or 'train'})",
                         "test": f"{self.data} (test)"}
            else:
                fractions = self.split or (0.8, 0.1, 0.1)
                parts = self._partition(len(loaded), fractions, seed, loaded)
                frames = [loaded.iloc[idx].reset_index(drop=True) for idx in parts]
                for frame, name in zip(frames, ("train", "validation", "test")):
                    if len(frame) == 0:
                        raise ValueError(f"split {list(fractions)} of the {len(loaded)} rows of data {str(self.data)!r} "
                                         f"leaves the {name} split empty")
                return tuple(frames), {"train": str(self.data), "val": str(self.data), "test": str(self.data)}
        else:
            train = read_table(self.files["train_file"], "train_file")
            test = read_table(self.files["test_file"], "test_file")
            val = None if self.files["validation_file"] is None else read_table(self.files["validation_file"],
                                                                                "validation_file")
            for option, frame in (("train_file", train), ("test_file", test), ("validation_file", val)):
                if isinstance(frame, dict):
                    raise ValueError(f"{option}: {str(self.files[option])!r} is a DatasetDict; name it as data")
            where = {"train": str(self.files["train_file"]), "test": str(self.files["test_file"]),
                     "val": str(self.files["validation_file"] or self.files["train_file"])}
        if val is None:
            fraction = self.validation_fraction or 0.1
            parts = self._partition(len(train), (1 - fraction, fraction, 0.0), seed, train)
            keep = np.sort(np.concatenate([parts[0], parts[2]]))  # rounding may leave a row in the third part
            train, val = train.iloc[keep].reset_index(drop=True), train.iloc[parts[1]].reset_index(drop=True)
        for frame, name in ((train, "train"), (val, "val"), (test, "test")):
            if len(frame) == 0:
                raise ValueError(f"the {'validation' if name == 'val' else name} split from {where[name]} has no rows")
        return (train, val, test), where

    def _texts(self, frame, column: str, where: str) -> List[str]:
        values = frame[column].tolist()
        for row, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"{where}: row {row} has no {column!r} text")
        return [value if isinstance(value, str) else str(value) for value in values]

    def _encode(self, frame, where: str) -> Dict[str, List[List[int]]]:
        texts = self._texts(frame, self.text_column, where)
        pairs = self._pairs(frame, where)
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        return {key: list(encoded[key]) for key in self._input_names() if key in encoded}

    def _pairs(self, frame, where: str) -> Optional[List[str]]:
        return None

    def load_data(self, seed: int = 0) -> DataSplits:
        frames, where = self.split_frames(seed)
        datasets = [self._dataset(frame, where[name]) for frame, name in zip(frames, ("train", "val", "test"))]
        return DataSplits(*datasets, collate_fn=PadCollate(self.pad_id))

    def _dataset(self, frame, where: str) -> TokenDataset:
        raise NotImplementedError

    def example_batch(self, batch_size: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Random token ids, ``max_length`` long (the per-sample upper bound of the cost)."""
        generator = torch.Generator().manual_seed(seed)
        vocab = int(getattr(self.config, "vocab_size", None) or len(self.tokenizer))
        return {"input_ids": torch.randint(0, vocab, (batch_size, self.max_length), generator=generator),
                "attention_mask": torch.ones(batch_size, self.max_length, dtype=torch.long)}

    def _loader(self, split: Dataset, batch_size: Optional[int], collate_fn):
        return make_loader(split, int(batch_size or self.default_batch_size),
                           collate_fn=collate_fn or PadCollate(self.pad_id))

    @property
    def tokens_per_sample(self) -> int:
        """``max_length``: an upper bound (batches are padded to their longest row)."""
        return self.max_length

    def nonlinear_flops_per_sample(self, model: nn.Module) -> int:
        return attention_flops(int(self.config.num_hidden_layers), self.max_length, int(self.config.hidden_size))

    def _data_options(self) -> Dict[str, Any]:
        return {"model_dir": str(self.model_dir), "data": None if self.data is None else str(self.data),
                **{name: None if path is None else str(path) for name, path in self.files.items()},
                "text_column": self.text_column, "max_length": self.max_length,
                "split": None if self.split is None else list(self.split),
                "validation_fraction": self.validation_fraction}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@register_workload("hf-sequence-classification")
class HFSequenceClassification(_HFWorkload):
    """A ``transformers`` sequence classifier from ``model_dir``, on labelled text rows.

    ``pretrained`` is True when the checkpoint holds a classification head of ``num_labels``
    outputs; otherwise (a base model such as a sentence encoder, or another label count) the
    head is new and the trainer first fine-tunes the dense model (``default_epochs`` epochs at
    ``default_lr``) and caches it, as for a workload trained from scratch."""

    auto_class = "AutoModelForSequenceClassification"
    task = "sequence classification"
    mapping_names = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"

    def __init__(
        self,
        *,
        model_dir: Union[str, Path, None] = None,
        data: Union[str, Path, None] = None,
        train_file: Union[str, Path, None] = None,
        validation_file: Union[str, Path, None] = None,
        test_file: Union[str, Path, None] = None,
        text_column: str = "text",
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        labels: Optional[Sequence[Any]] = None,
        num_labels: Optional[int] = None,
        max_length: int = 128,
        split: Optional[Sequence[float]] = None,
        validation_fraction: Optional[float] = None,
    ) -> None:
        if text_pair_column is not None and (not isinstance(text_pair_column, str) or not text_pair_column):
            raise ValueError(f"text_pair_column must be a column name, got {text_pair_column!r}")
        if not isinstance(label_column, str) or not label_column:
            raise ValueError(f"label_column must be a column name, got {label_column!r}")
        if labels is not None:
            if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)) or len(labels) < 2:
                raise ValueError(f"labels must be a list of at least two label values (class 0, 1, ...), got {labels!r}")
            texts = [_label_text(v) for v in labels]
            if len(set(texts)) != len(texts):
                raise ValueError(f"labels must be distinct, got {labels!r}")
        if num_labels is not None:
            check_positive_int("num_labels", num_labels)
            if num_labels < 2:
                raise ValueError(f"num_labels must be at least 2, got {num_labels!r}")
            if labels is not None and num_labels != len(labels):
                raise ValueError(f"num_labels {num_labels} differs from the {len(labels)} labels listed")
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.labels = None if labels is None else list(labels)
        self._num_labels_option = num_labels
        super().__init__(model_dir=model_dir, data=data, train_file=train_file, validation_file=validation_file,
                         test_file=test_file, text_column=text_column, max_length=max_length, split=split,
                         validation_fraction=validation_fraction)
        self.num_labels = len(self.labels) if self.labels is not None else (num_labels or int(self.config.num_labels))
        architectures = list(getattr(self.config, "architectures", None) or [])
        self.has_head = (any(a.endswith("ForSequenceClassification") for a in architectures)
                         and self.num_labels == int(self.config.num_labels))
        self.pretrained = self.has_head
        options = {**self._data_options(), "text_pair_column": text_pair_column, "label_column": label_column,
                   "labels": self.labels, "num_labels": self.num_labels}
        if not self.pretrained:  # the dense model is trained and cached: key it by the checkpoint too
            options["checkpoint"] = self._fingerprint()
        record_options(self, options)

    def _load_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"num_labels": self.num_labels}
        if self.labels is not None:
            kwargs["id2label"] = {i: _label_text(v) for i, v in enumerate(self.labels)}
            kwargs["label2id"] = {_label_text(v): i for i, v in enumerate(self.labels)}
        if self.num_labels != int(self.config.num_labels):
            kwargs["ignore_mismatched_sizes"] = True  # a head of another size: a new one
        return kwargs

    def _columns(self) -> List[Tuple[str, str]]:
        columns = [("text_column", self.text_column), ("label_column", self.label_column)]
        if self.text_pair_column is not None:
            columns.append(("text_pair_column", self.text_pair_column))
        return columns

    def _strata(self, frame) -> np.ndarray:
        return np.asarray([_label_text(v) for v in frame[self.label_column].tolist()])

    def _pairs(self, frame, where: str) -> Optional[List[str]]:
        if self.text_pair_column is None:
            return None
        return self._texts(frame, self.text_pair_column, where)

    def label_ids(self, values: Sequence[Any], where: str) -> List[int]:
        """Class indices of the label values: by the ``labels`` option (matched as text), else
        integers as they are, else text by the model's ``label2id``."""
        column = self.label_column
        if self.labels is not None:
            index = {_label_text(v): i for i, v in enumerate(self.labels)}
            ids = []
            for value in values:
                if _label_text(value) not in index:
                    raise ValueError(f"label_column {column!r}: {value!r} in {where} is not one of the labels "
                                     f"{self.labels}")
                ids.append(index[_label_text(value)])
            return ids
        ids = []
        label2id = {str(k): int(v) for k, v in (getattr(self.config, "label2id", None) or {}).items()}
        for value in values:
            if isinstance(value, (bool, np.bool_)):
                number = int(value)
            elif isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating))
                                                          and float(value).is_integer()):
                number = int(value)
            elif isinstance(value, str) and value in label2id:
                number = label2id[value]
            else:
                raise ValueError(
                    f"label_column {column!r}: {value!r} in {where} is neither a class index nor a label of the "
                    f"model's label2id ({', '.join(label2id) or 'none'}); list the labels in class order in the option labels")
            if not 0 <= number < self.num_labels:
                raise ValueError(f"label_column {column!r}: class {number} in {where} is outside 0..{self.num_labels - 1} "
                                 f"(num_labels {self.num_labels}; set the option num_labels or labels)")
            ids.append(number)
        return ids

    def _dataset(self, frame, where: str) -> TokenDataset:
        return TokenDataset(self._encode(frame, where), self.label_ids(frame[self.label_column].tolist(), where))

    def example_batch(self, batch_size: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
        batch = super().example_batch(batch_size, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        batch["labels"] = torch.randint(0, self.num_labels, (batch_size,), generator=generator)
        return batch

    def loss(self, model_output: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model_output, batch["labels"])

    def evaluate(self, model, split, *, batch_size=None, device=None, collate_fn=None) -> Dict[str, float]:
        """``{"quality": accuracy, "accuracy": ..., "loss": mean cross-entropy}``."""
        was_training = model.training
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        try:
            with torch.no_grad():
                for batch in self._loader(split, batch_size, collate_fn):
                    batch = move_to_device(batch, device)
                    logits = self.forward(model, batch)  # (B, classes)
                    labels = batch["labels"]
                    loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
                    correct += (logits.argmax(dim=-1) == labels).sum().item()
                    total += labels.numel()
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError("cannot evaluate on an empty split")
        return {"quality": correct / total, "accuracy": correct / total, "loss": loss_sum / total}


@register_workload("hf-causal-lm")
class HFCausalLM(_HFWorkload):
    """A ``transformers`` causal language model from ``model_dir``, on text rows: each row is one
    sequence (the tokenizer's special tokens added, truncated to ``max_length``); the loss is the
    mean next-token negative log-likelihood over the real (unpadded) tokens of a batch."""

    auto_class = "AutoModelForCausalLM"
    task = "causal language"
    mapping_names = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    _forward_kwargs = {"use_cache": False}

    def __init__(
        self,
        *,
        model_dir: Union[str, Path, None] = None,
        data: Union[str, Path, None] = None,
        train_file: Union[str, Path, None] = None,
        validation_file: Union[str, Path, None] = None,
        test_file: Union[str, Path, None] = None,
        text_column: str = "text",
        max_length: int = 128,
        split: Optional[Sequence[float]] = None,
        validation_fraction: Optional[float] = None,
    ) -> None:
        super().__init__(model_dir=model_dir, data=data, train_file=train_file, validation_file=validation_file,
                         test_file=test_file, text_column=text_column, max_length=max_length, split=split,
                         validation_fraction=validation_fraction)
        record_options(self, self._data_options())

    def _dataset(self, frame, where: str) -> TokenDataset:
        encodings = self._encode(frame, where)
        keep = [i for i, ids in enumerate(encodings["input_ids"]) if len(ids) >= 2]  # one token predicts nothing
        if not keep:
            raise ValueError(f"{where}: no row has two tokens or more, nothing to predict")
        return TokenDataset({key: [values[i] for i in keep] for key, values in encodings.items()})

    @staticmethod
    def _predicted(model_output: torch.Tensor, batch: Dict[str, torch.Tensor], other: Optional[torch.Tensor] = None):
        """The logits of every real next-token prediction (N, vocab) and its target token (N,)
        (and ``other``'s logits at the same places): position t predicts token t+1."""
        mask = batch["attention_mask"][:, 1:].bool()  # (B, T-1): the target is a real token
        targets = batch["input_ids"][:, 1:][mask]  # (N,)
        logits = model_output[:, :-1][mask]  # (N, vocab)
        return logits, targets, (None if other is None else other[:, :-1][mask])

    def loss(self, model_output: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets, _ = self._predicted(model_output, batch)
        return nn.functional.cross_entropy(logits.float(), targets)

    def distillation_loss(self, model_output, teacher_output, batch, temperature):
        """The default KL term over the real next-token predictions only (padding left out)."""
        student, _, teacher = self._predicted(model_output, batch, teacher_output)
        return super().distillation_loss(student, teacher, batch, temperature)

    def evaluate(self, model, split, *, batch_size=None, device=None, collate_fn=None) -> Dict[str, float]:
        """``loss``: mean next-token NLL over every predicted token of the split (nats);
        ``perplexity`` = exp(loss); ``quality`` = -loss (= -log perplexity); ``next_token_accuracy``."""
        was_training = model.training
        model.eval()
        nll_sum, correct, count = 0.0, 0, 0
        try:
            with torch.no_grad():
                for batch in self._loader(split, batch_size, collate_fn):
                    batch = move_to_device(batch, device)
                    logits, targets, _ = self._predicted(self.forward(model, batch), batch)
                    nll_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
                    correct += (logits.argmax(dim=-1) == targets).sum().item()
                    count += targets.numel()
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("cannot evaluate on an empty split")
        loss = nll_sum / count
        return {"quality": -loss, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "next_token_accuracy": correct / count}
