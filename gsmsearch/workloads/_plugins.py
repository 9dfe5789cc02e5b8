"""Workloads from outside gsmsearch, and the one place a workload name is resolved to its class.

A spec's ``workload.name`` (and :func:`~gsmsearch.workloads.get_workload`'s name) is one of:

* a built-in name (``digits-mlp``; :func:`~gsmsearch.workloads.workload_names`);
* ``path/to/file.py:ClassName`` -- a Python file, relative to the spec's folder (the current
  folder where no spec folder is known).  The file is read once, when the spec is validated; its
  text travels to every Ray worker with the worker's creation (:func:`shipped_files`,
  :func:`receive_files`), so a worker runs the validated text and needs no shared filesystem;
* ``module.path:ClassName`` -- a module importable in the driver and on every worker;
* a name an installed package registers under the entry-point group ``gsmsearch.workloads``
  (``[project.entry-points."gsmsearch.workloads"] my-task = "my_pkg.workload:MyTask"``).

A bad reference raises :class:`WorkloadReferenceError` (a ``ValueError``) in one line that says
what was looked for and, for an error inside the user's code, the user's ``file:line``.  An
exception raised by a plugin's own code during a trial becomes a :class:`WorkloadCodeError`
whose message starts with the user's ``file:line`` (:func:`user_code_error`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import linecache
import os
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Type, Union

__all__ = [
    "ENTRY_POINT_GROUP",
    "WorkloadReferenceError",
    "WorkloadCodeError",
    "resolve_workload",
    "is_builtin",
    "entry_point_names",
    "shipped_files",
    "receive_files",
    "user_code_error",
    "user_code_location",
]

ENTRY_POINT_GROUP = "gsmsearch.workloads"
#: Largest workload file read (bytes).
MAX_WORKLOAD_FILE_BYTES = 4 << 20
#: What a plugin workload's ``name`` may be (it names its dense-model cache files).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class WorkloadReferenceError(ValueError):
    """A workload name that resolves to no usable :class:`Workload` class (one line)."""


class WorkloadCodeError(RuntimeError):
    """An exception raised inside a plugin workload's own code; the message is
    ``file:line in function: ExceptionType: message``."""


@dataclasses.dataclass(frozen=True)
class _File:
    written: str  # the path as the reference writes it
    path: str  # absolute, on the machine that read it
    source: str


_FILES: Dict[str, _File] = {}  # written path -> the text read at validation, or received by a worker
_MODULES: Dict[tuple, types.ModuleType] = {}  # (path, digest of the text) -> the module run from it
_RESOLVED: Dict[str, type] = {}  # module and entry-point references already resolved


def is_builtin(name: str) -> bool:
    from ._registry import _WORKLOADS

    return name in _WORKLOADS


def _is_file_reference(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def resolve_workload(reference: str, *, spec_dir: Union[str, Path, None] = None) -> Type:
    """The :class:`Workload` subclass ``reference`` names (see the module docstring);
    ``spec_dir`` is the folder a file reference is relative to."""
    from ._registry import _WORKLOADS

    if not isinstance(reference, str) or not reference.strip():
        raise WorkloadReferenceError(f"a workload name must be a non-empty string, got {reference!r}")
    if reference in _WORKLOADS:
        return _WORKLOADS[reference]
    target, colon, class_name = reference.rpartition(":")
    if colon and target and class_name:
        if _is_file_reference(target):
            module = _file_module(target, spec_dir)
            where = _shown(module.__file__)
        elif reference in _RESOLVED:
            return _RESOLVED[reference]
        else:
            module = _import_module(target, reference)
            where = f"module {target!r}"
        cls = getattr(module, class_name, None)
        if cls is None:
            found = sorted(n for n, v in vars(module).items() if _is_workload_class(v) and v.__module__ == module.__name__)
            raise WorkloadReferenceError(
                f"{where} has no class {class_name!r}; its Workload classes: {', '.join(found) or 'none'}")
        cls = _checked(cls, reference)
        if not _is_file_reference(target):
            _RESOLVED[reference] = cls
        return cls
    if colon:
        raise WorkloadReferenceError(f"workload {reference!r}: expected module.path:ClassName or "
                                     f"path/to/file.py:ClassName")
    if reference in _RESOLVED:
        return _RESOLVED[reference]
    entry = _entry_points().get(reference)
    if entry is None:
        raise WorkloadReferenceError(
            f"unknown workload {reference!r}; expected one of: {', '.join(sorted(_WORKLOADS))}"
            f"{''.join(f', {n}' for n in entry_point_names())} (installed), module.path:ClassName or "
            f"path/to/file.py:ClassName")
    try:
        loaded = entry.load()
    except Exception as error:  # noqa: BLE001 - the user's import, shown in one line
        raise WorkloadReferenceError(
            f"workload {reference!r} (entry point {entry.value} of {_distribution(entry)}) cannot be loaded: "
            f"{one_line(error)}{_at(error, _in_package(entry.module.partition('.')[0]))}") from None
    cls = _checked(loaded, f"{reference} ({entry.value})")
    _RESOLVED[reference] = cls
    return cls


def entry_point_names() -> List[str]:
    """Workload names registered by installed packages (group ``gsmsearch.workloads``)."""
    return sorted(_entry_points())


def _entry_points() -> Dict[str, importlib.metadata.EntryPoint]:
    from ._registry import _WORKLOADS

    found: Dict[str, importlib.metadata.EntryPoint] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _WORKLOADS:
            continue  # a built-in name always means the built-in
        if entry.name in found and found[entry.name].value != entry.value:
            raise WorkloadReferenceError(
                f"workload {entry.name!r} is registered by two installed packages: {found[entry.name].value} "
                f"({_distribution(found[entry.name])}) and {entry.value} ({_distribution(entry)})")
        found[entry.name] = entry
    return found


def _distribution(entry) -> str:
    dist = getattr(entry, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an installed package"


def _is_workload_class(value) -> bool:
    from ._registry import Workload

    return isinstance(value, type) and issubclass(value, Workload) and value is not Workload


def _checked(cls, reference: str) -> Type:
    """``cls`` if it is a usable Workload subclass, else a one-line error."""
    from ._registry import Workload

    if not isinstance(cls, type) or not issubclass(cls, Workload):
        kind = "a class" if isinstance(cls, type) else type(cls).__name__
        raise WorkloadReferenceError(f"workload {reference!r} is {kind}, not a subclass of "
                                     f"gsmsearch.workloads.Workload")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise WorkloadReferenceError(f"workload {reference!r} does not implement {', '.join(missing)} "
                                     f"(required methods of Workload; see docs/workloads.md)")
    name = cls.__dict__.get("name") or ""
    if name and not re.fullmatch(NAME_PATTERN, name):
        raise WorkloadReferenceError(f"workload {reference!r}: its name {name!r} must use letters, digits, "
                                     f"'.', '_' and '-' (it names cache files)")
    return cls


def plugin_name(cls: Type) -> str:
    """The ``name`` of an instance of a plugin class: its own ``name`` if it sets one, else its
    class name."""
    return cls.__dict__.get("name") or cls.__name__


# -- file references -------------------------------------------------------------------------

def _read_file(written: str, spec_dir: Union[str, Path, None]) -> _File:
    base = Path(spec_dir) if spec_dir is not None else Path.cwd()
    path = Path(written).expanduser()
    path = Path(os.path.abspath(path if path.is_absolute() else base / path))
    relative = "" if Path(written).is_absolute() else f" (relative to {base})"
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise WorkloadReferenceError(f"workload file {path} {problem}{relative}")
    size = path.stat().st_size
    if size > MAX_WORKLOAD_FILE_BYTES:
        raise WorkloadReferenceError(f"workload file {path} has {size} bytes; at most {MAX_WORKLOAD_FILE_BYTES}")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise WorkloadReferenceError(f"workload file {path}: cannot read it: {one_line(error)}") from None
    return _File(written, str(path), source)


def _file_module(written: str, spec_dir: Union[str, Path, None]) -> types.ModuleType:
    """The module run from the file ``written`` names: read now where ``spec_dir`` is given or the
    file is not known yet, else the text read (or received) before."""
    if spec_dir is not None or written not in _FILES:
        _FILES[written] = _read_file(written, spec_dir)
    return _run_file(_FILES[written])


def _run_file(file: _File) -> types.ModuleType:
    # the module's name is the same wherever this (path, text) runs -- the driver and every
    # worker -- and differs for the same text at another path, so classes never resolve to
    # another file's module (sys.modules is keyed by the name)
    digest = hashlib.sha256(f"{file.path}\0{file.source}".encode()).hexdigest()[:12]
    key = (file.path, digest)
    if key in _MODULES:
        return _MODULES[key]
    stem = re.sub(r"\W", "_", Path(file.path).stem)
    name = f"_gsmsearch_workload_{stem}_{digest}"
    module = types.ModuleType(name)
    module.__file__ = file.path
    # tracebacks show the text that ran, also where the file is not on this machine
    linecache.cache[file.path] = (len(file.source), None, file.source.splitlines(True), file.path)
    folder = str(Path(file.path).parent)
    if os.path.isdir(folder) and folder not in sys.path:
        sys.path.insert(0, folder)  # its sibling modules import as they would beside a script (first)
    try:
        code = compile(file.source, file.path, "exec")
    except SyntaxError as error:
        raise WorkloadReferenceError(f"workload file {_shown(file.path)}:{error.lineno}: SyntaxError: "
                                     f"{error.msg}") from None
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the user's workload file is the point
    except Exception as error:  # noqa: BLE001 - the user's code, shown in one line
        del sys.modules[name]
        raise WorkloadReferenceError(f"importing workload file {_shown(file.path)} raised "
                                     f"{one_line(error)}{_at(error, _in_files([file.path]))}") from None
    _MODULES[key] = module
    return module


def shipped_files() -> List[Dict[str, str]]:
    """The workload files read in this process, as plain data for :func:`receive_files` in a
    Ray worker (the driver passes them when it creates a worker)."""
    return [dataclasses.asdict(file) for file in _FILES.values()]


def receive_files(files: List[Dict[str, str]]) -> None:
    """Make the workload files of :func:`shipped_files` the ones this process resolves."""
    for item in files or ():
        file = _File(**item)
        _FILES[file.written] = file


# -- module references ----------------------------------------------------------------------

def _import_module(target: str, reference: str) -> types.ModuleType:
    top = target.partition(".")[0]
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and (target == error.name or target.startswith(error.name + ".")):
            raise WorkloadReferenceError(
                f"workload {reference!r}: no module named {error.name!r} (a module reference must be "
                f"importable in the driver and on every Ray worker; see docs/workloads.md)") from None
        raise WorkloadReferenceError(f"importing module {target!r} of workload {reference!r} raised "
                                     f"{one_line(error)}{_at(error, _in_package(top))}") from None
    except Exception as error:  # noqa: BLE001 - the user's code, shown in one line
        raise WorkloadReferenceError(f"importing module {target!r} of workload {reference!r} raised "
                                     f"{one_line(error)}{_at(error, _in_package(top))}") from None


# -- where in the user's code ---------------------------------------------------------------

def _in_files(paths) -> Callable[[str], bool]:
    wanted = {os.path.abspath(p) for p in paths}
    return lambda filename: os.path.abspath(filename) in wanted


def _in_package(top: str) -> Callable[[str], bool]:
    """Whether a file belongs to the top-level module or package ``top``."""
    module = sys.modules.get(top)
    roots: List[str] = []
    if module is not None:
        roots = list(getattr(module, "__path__", None) or []) or [getattr(module, "__file__", None) or ""]
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            roots = list(spec.submodule_search_locations or []) or [spec.origin or ""]
    roots = [os.path.abspath(r) for r in roots if r]

    def belongs(filename: str) -> bool:
        path = os.path.abspath(filename)
        return any(path == root or path.startswith(root + os.sep) for root in roots)

    return belongs


def _belongs_to(cls: Type) -> Callable[[str], bool]:
    module = sys.modules.get(cls.__module__)
    if module is not None and module.__name__.startswith("_gsmsearch_workload_"):
        folder = os.path.dirname(os.path.abspath(module.__file__))
        # the file, and the modules beside it that it imports
        return lambda filename: os.path.dirname(os.path.abspath(filename)) == folder
    return _in_package(cls.__module__.partition(".")[0])


def user_code_location(error: BaseException, belongs: Callable[[str], bool]) -> Optional[str]:
    """``file:line in function`` of the deepest frame of ``error``'s traceback in a file that
    ``belongs``; None if there is none."""
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        if belongs(frame.filename):
            found = frame
    if found is None:
        return None
    return f"{_shown(found.filename)}:{found.lineno} in {found.name}"


def user_code_error(error: BaseException, reference: str) -> Optional[WorkloadCodeError]:
    """A :class:`WorkloadCodeError` for ``error`` where it was raised in the code of the plugin
    workload ``reference`` (its file, or its top-level package), else None (built-in workloads,
    errors raised elsewhere)."""
    if is_builtin(reference) or isinstance(error, WorkloadReferenceError):
        return None
    try:
        cls = resolve_workload(reference)
    except Exception:  # noqa: BLE001 - not resolvable here: nothing to locate
        return None
    where = user_code_location(error, _belongs_to(cls))
    if where is None:
        return None
    return WorkloadCodeError(f"{where}: {one_line(error)}")


def located(error: BaseException, cls: Type) -> str:
    """`` (file:line in function)`` for ``error`` raised in the code of plugin class ``cls``, or ""."""
    where = user_code_location(error, _belongs_to(cls))
    return f" ({where})" if where else ""


def _at(error: BaseException, belongs) -> str:
    where = user_code_location(error, belongs)
    return f" ({where})" if where else ""


def one_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _shown(path: str) -> str:
    """``path`` relative to the current folder when inside it, else absolute."""
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute)
    except ValueError:
        return absolute
    return absolute if relative.startswith("..") else relative
