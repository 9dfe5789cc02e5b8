"""Dense models trained once per (workload, options, seed, code version) and cached on disk.

Fine-tune trials start from the same dense model.  The first process to need it trains it while
holding an exclusive file lock; others wait on the lock and then load the file, so two trials
starting together never train it twice or read a half-written file (writes are atomic).
"""
from __future__ import annotations

import ast
import fcntl
import functools
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Callable, Dict, Tuple

from torch import nn

__all__ = ["default_cache_dir", "dense_cache_key", "cached_dense_state", "code_fingerprint", "written_once"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("GSMSEARCH_CACHE", Path.home() / ".cache" / "gsmsearch"))


@functools.lru_cache(maxsize=None)
def code_fingerprint(module) -> str:
    """What a module computes, for cache keys: its syntax tree without docstrings (comments are
    not in it), so editing a comment or a docstring does not retrain or refit anything, while
    any change to the code does.  The source text where the tree cannot be had.  Computed once
    per module and process (parsing and dumping a module's tree takes 10-50 ms, and a
    fine-tune trial asks for a dozen keys: 1.3 s of a Mixer trial before; the code a process
    runs does not change while it runs)."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return ""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # pragma: no cover - a module that imported parses
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def _code_version(workload) -> str:
    """gsmsearch version + the code of the workload's module, of the training loop and of its
    optimizer."""
    import gsmsearch
    from . import _loop, _optimizer

    digest = hashlib.sha256(gsmsearch.__version__.encode())
    for module in (inspect.getmodule(type(workload)), _loop, _optimizer):
        digest.update(code_fingerprint(module).encode())
    return digest.hexdigest()[:12]


def dense_cache_key(workload, *, seed: int, recipe: dict) -> str:
    payload = json.dumps(
        {"workload": workload.name, "options": workload.options(), "seed": seed, "recipe": recipe},
        sort_keys=True,
        default=str,
    )
    return f"{workload.name}-s{seed}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}-{_code_version(workload)}"


def written_once(path: Path, make: Callable[[], Tuple[nn.Module, Dict[str, str]]]) -> Path:
    """``path``: a safetensors file of the state dict and metadata ``make()`` returns, created by the first process
    that needs it while it holds an exclusive lock beside it; others wait on the lock and then
    find the file.  Written to a temporary name and renamed, so it is never seen half-written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            module, metadata = make()
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file(state, str(tmp), metadata=metadata)
            tmp.replace(path)
    return path


def cached_dense_state(
    workload, *, seed: int, recipe: dict, train: Callable[[], nn.Module], cache_dir=None
) -> dict:
    """The dense model's state dict from the cache, training it with ``train()`` if absent."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = dense_cache_key(workload, seed=seed, recipe=recipe)
    return load_file(str(written_once(cache_dir / f"{key}.safetensors", lambda: (train(), {"key": key}))))
