"""Every file a command writes (`report -o`, `export -o`) goes through here.

An output is a regular file (replaced whole: written beside it, then renamed over it) or a new
path.  A device (/dev/null, /dev/full, /dev/stdout), a FIFO, a socket, or a link to one of these
is refused, as are a folder, a study's database, a spec file given on the command line and any
SQLite database: renaming a file over /dev/null would replace the device itself.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Iterable, Optional

from ._errors import UsageError

__all__ = ["check_output_path", "write_output", "sqlite_file"]

SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_file(url: str) -> Optional[Path]:
    """The resolved path of the SQLite file behind a storage URL (None for other databases or a
    URL that cannot be read here)."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(os.path.expandvars(url))
        if parsed.get_backend_name() != "sqlite":
            return None
        database = parsed.database or ""
        if database.startswith("file:"):
            database = database[len("file:"):].split("?", 1)[0]
        if database in ("", ":memory:"):
            return None
        return Path(database).expanduser().resolve()
    except Exception:  # noqa: BLE001 - the storage itself reports a bad URL
        return None


def _existing_kind(path: Path, output, flag: str) -> Optional[os.stat_result]:
    """The stat of what ``path`` names (links followed), None if nothing is there; UsageError when
    it is there but is not a regular file."""
    try:
        info = os.stat(path)
    except NotADirectoryError:  # a file on the way: the folder checks say which
        return None
    except FileNotFoundError:
        if os.path.islink(path):  # a dangling link: the rename would replace the link, not its target
            raise UsageError(f"{flag} {output}: a link to a missing file; give the file itself") from None
        return None
    except OSError as error:
        raise UsageError(f"{flag} {output}: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{flag} {output}: is a directory; expected an output file")
    if not stat.S_ISREG(info.st_mode):
        from ..search._spec import file_kind

        raise UsageError(f"{flag} {output}: is {file_kind(info.st_mode)}; expected a regular file or a new path")
    return info


def check_output_path(output, *, databases: Iterable[str] = (), specs: Iterable = (),
                      flag: str = "-o/--output") -> Path:
    """``output`` as a Path once it is safe to write: a regular file or a new path in an existing
    folder, neither a study's database (a storage URL in ``databases``), a spec file given
    (``specs``) nor any SQLite database.  Raises UsageError otherwise; nothing is written here."""
    path = Path(output)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # a link loop
        raise UsageError(f"{flag} {output}: {getattr(error, 'strerror', None) or error}") from None
    for url in databases:
        db = sqlite_file(url)
        if db is not None and resolved == db:
            raise UsageError(f"refusing to overwrite {output}: it is the study's database")
    for spec in specs:
        if spec is not None and resolved == Path(spec).resolve():
            raise UsageError(f"refusing to overwrite {output}: it is the spec file")
    info = _existing_kind(path, output, flag)
    parent = resolved.parent
    if not parent.exists():
        raise UsageError(f"{flag} {output}: its folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag} {output}: {parent} is not a folder")
    if info is not None:
        try:
            with open(path, "rb") as handle:
                head = handle.read(16)
        except OSError:
            head = b""
        if head == SQLITE_MAGIC:
            raise UsageError(f"refusing to overwrite {output}: it is an SQLite database (a study's "
                             f"storage?); choose another -o file")
    return path


def write_output(path, write: Callable[[Path], None], *, flag: str = "-o/--output") -> int:
    """Write an output checked by :func:`check_output_path`: ``write(temporary path)`` fills a new
    file beside it, which then replaces ``path`` (a reader never sees half a file, a failed write
    leaves the old one).  Returns the size written."""
    import tempfile

    path = Path(path)
    target = path.resolve()  # a link to a regular file: the file it names is replaced
    existing = _existing_kind(target, path, flag)  # checked again just before writing
    if existing is not None:
        mode = stat.S_IMODE(existing.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:100]}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        size = tmp.stat().st_size
        os.chmod(tmp, mode)  # as a file created by open() would be (mkstemp makes it private)
        _existing_kind(target, path, flag)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size
