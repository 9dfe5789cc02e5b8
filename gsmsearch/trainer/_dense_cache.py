"""Dense models trained once per (workload, options, seed, recipe, code) and cached on disk.

Fine-tune trials start from the same dense model.  The first process to need it trains it while
holding an exclusive file lock; others wait on the lock and then load the file, so two trials
starting together never train it twice or read a half-written file (writes are atomic).

The code part of a key (:func:`code_digest`) covers every module whose code can change the
result: the roots (the workload's module, the training loop, its optimizer) and every module of
the project they import, directly or not, lazy imports inside functions included
(:func:`module_closure`, read from the sources' syntax trees, so the same in every process),
plus the versions of gsmsearch, torch and numpy.  Comments and docstrings are not code.
"""
from __future__ import annotations

import ast
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["default_cache_dir", "dense_cache_key", "cached_dense_state", "code_digest", "code_fingerprint",
           "module_closure", "written_once"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("GSMSEARCH_CACHE", Path.home() / ".cache" / "gsmsearch"))


def _code_tree(source: str) -> Optional[ast.Module]:
    """The syntax tree of ``source`` without docstrings (comments are not in it); None where it
    does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in [tree, *_statements(tree.body)]:
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _statements(nodes, into_definitions: bool = True):
    """The statements among ``nodes`` and in their blocks, nested ones included (function and
    class bodies only with ``into_definitions``); statements are where imports and docstrings
    are, so expressions are not visited."""
    for node in nodes:
        yield node
        if not into_definitions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in _BLOCKS:
            block = getattr(node, field, None)
            if isinstance(block, list):
                yield from _statements(block, into_definitions)


def _tree_fingerprint(source: str, tree: Optional[ast.Module] = None) -> str:
    """What ``source`` computes: its :func:`_code_tree` (``tree`` where given), so editing a
    comment or a docstring does not retrain or refit anything, while any change to the code
    does.  The text itself where it does not parse."""
    tree = _code_tree(source) if tree is None else tree
    return source if tree is None else ast.dump(tree, annotate_fields=False)


@functools.lru_cache(maxsize=None)
def code_fingerprint(module) -> str:
    """:func:`_tree_fingerprint` of a module object's source ('' where it has none)."""
    try:
        return _tree_fingerprint(inspect.getsource(module))
    except (OSError, TypeError):
        return ""


@functools.lru_cache(maxsize=None)
def _function_fingerprint(code) -> str:
    """:func:`_tree_fingerprint` of the source of a function's code object ('' where it has none)."""
    try:
        return _tree_fingerprint(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError):
        return ""


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _is_module(name: str) -> bool:
    return name in sys.modules or _spec(name) is not None


@functools.lru_cache(maxsize=None)
def _is_package(name: str) -> bool:
    module = sys.modules.get(name)
    if module is not None:
        return hasattr(module, "__path__")
    spec = _spec(name)
    return spec is not None and spec.submodule_search_locations is not None


@functools.lru_cache(maxsize=None)
def module_source(name: str) -> str:
    """The source text of the module ``name``, read from its file without running it ('' for a
    module without a Python source file).  Read once per process: the code a process runs does
    not change while it runs."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        spec = _spec(name)
        path = spec.origin if spec is not None and spec.has_location else None
    if not path or not str(path).endswith(".py"):
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def _tree(name: str) -> Optional[ast.Module]:
    """:func:`_code_tree` of the module ``name``, parsed once per module and process."""
    return _code_tree(module_source(name))


@functools.lru_cache(maxsize=None)
def module_fingerprint(name: str) -> str:
    """:func:`_tree_fingerprint` of the module ``name``'s source, once per module and process
    (parsing and dumping a module's tree takes 10-50 ms)."""
    return _tree_fingerprint(module_source(name), _tree(name))


def _absolute(name: str, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` in module ``name`` imports from."""
    if not node.level:
        return node.module or ""
    package = name if _is_package(name) else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@functools.lru_cache(maxsize=None)
def _defined_in(module: str, attr: str, depth: int = 0) -> str:
    """The module whose code defines the name ``attr`` that ``from module import attr`` gets:
    the submodule of that name, the module a re-export (``from .x import attr``) points to,
    else ``module`` itself."""
    if _is_package(module) and _is_module(f"{module}.{attr}"):
        return f"{module}.{attr}"
    tree = _tree(module)
    if tree is not None and depth < 20:
        for node in _statements(tree.body, into_definitions=False):  # what importing it runs
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == attr and alias.name != "*":
                        return _defined_in(_absolute(module, node), alias.name, depth + 1)
    return module


@functools.lru_cache(maxsize=None)
def imported_modules(name: str, scope: Tuple[str, ...] = ("gsmsearch",)) -> Tuple[str, ...]:
    """The modules the code of module ``name`` imports, anywhere in it (lazy imports inside
    functions included), found in its syntax tree without running it.  ``from package import
    thing`` from a package of ``scope`` counts as an import of the module that defines
    ``thing`` (a package that only re-exports it adds nothing of its own)."""
    tree = _tree(name)
    found = set()
    for node in _statements(tree.body) if tree is not None else ():
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(name, node)
            if source.partition(".")[0] not in scope:
                found.add(source)
                continue
            for alias in node.names:
                found.add(source if alias.name == "*" else _defined_in(source, alias.name))
    return tuple(sorted(found))


def module_closure(roots: Sequence[str], within: Sequence[str] = ("gsmsearch",)) -> Tuple[str, ...]:
    """``roots`` and every module they import, directly or not (:func:`imported_modules`),
    among the packages ``within`` and those of the roots: the code that can change what the
    roots compute, less third-party libraries (keyed by their versions instead)."""
    scope = tuple(sorted(set(within) | {root.partition(".")[0] for root in roots}))
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name.partition(".")[0] not in scope or not _is_module(name):
            continue
        seen.add(name)
        todo.extend(imported_modules(name, scope))
    return tuple(sorted(seen))


def code_digest(roots: Sequence[str], within: Sequence[str] = ("gsmsearch",)) -> str:
    """A digest of the versions of gsmsearch, torch and numpy and of the code of every module in
    :func:`module_closure` of ``roots``."""
    import numpy

    # the package's version, read without an import statement: ``import gsmsearch`` here would put
    # the whole package (every lazily imported module of its __init__) into each closure
    version = sys.modules[__name__.partition(".")[0]].__version__
    digest = hashlib.sha256(f"{version} {torch.__version__} {numpy.__version__}".encode())
    for name in module_closure(roots, within):
        digest.update(f"\0{name}\0{module_fingerprint(name)}".encode())
    return digest.hexdigest()


DENSE_CODE_ROOTS = ("gsmsearch.trainer._loop", "gsmsearch.trainer._optimizer")


def _code_version(workload, train: Optional[Callable] = None) -> str:
    """:func:`code_digest` of the workload's module, of the training loop and of its optimizer
    (with everything they import), and the code of ``train``."""
    digest = hashlib.sha256(code_digest((type(workload).__module__, *DENSE_CODE_ROOTS)).encode())
    code = getattr(train, "__code__", None)
    digest.update(_function_fingerprint(code).encode() if code is not None else b"")
    return digest.hexdigest()[:12]


def dense_cache_key(workload, *, seed: int, recipe: dict, train: Optional[Callable] = None) -> str:
    """The key of the dense model ``train()`` makes: the workload's name and options, the seed, the
    training recipe and the code version (:func:`_code_version`)."""
    payload = json.dumps(
        {"workload": workload.name, "options": workload.options(), "seed": seed, "recipe": recipe},
        sort_keys=True,
        default=str,
    )
    return (f"{workload.name}-s{seed}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}-"
            f"{_code_version(workload, train)}")


def written_once(path: Path, make: Callable[[], Tuple[nn.Module, Dict[str, str]]]) -> Path:
    """``path``: a safetensors file of the state dict and metadata ``make()`` returns, created by the first process
    that needs it while it holds an exclusive lock beside it; others wait on the lock and then
    find the file.  Written to a temporary name and renamed, so it is never seen half-written."""
    from safetensors.torch import save_file

    from ..structured._common import untied

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            module, metadata = make()
            state = untied({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
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
    key = dense_cache_key(workload, seed=seed, recipe=recipe, train=train)
    return load_file(str(written_once(cache_dir / f"{key}.safetensors", lambda: (train(), {"key": key}))))
