"""Atomic file writes: a reader never sees a half-written output.

Every writer in qsmnet goes through :func:`atomic_write` (NIfTI maps, JSON records,
``params.json``): the content is written to a temporary file in the destination's own folder
(so the final :func:`os.replace` is a rename on one file system, which POSIX makes atomic) and
only then moved over the destination. If anything fails, the temporary file is removed and the
destination is left as it was (absent, or its previous content). A process killed mid-write
cannot clean up: its temporary file carries its pid, and :func:`remove_stale_temp_files` (run
by the next writer of the folder, :func:`qsmnet.io.output_set.recover`) deletes those whose
process is gone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Read once: os.umask can only be read by setting it, which is not thread-safe to repeat.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
# ".<name>.<pid>.<8 random chars>.tmp[<suffix>]", as atomic_path names its temporary files
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that :func:`atomic_path` left in ``folder`` when its process
    was killed (those whose pid no longer runs); return their names."""
    removed = []
    for entry in os.scandir(folder):
        m = _TEMP_NAME.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``.

    Parameters
    ----------
    path : path-like
        Final destination. Parent folders are created.

    Yields
    ------
    Path
        An empty temporary file in the same folder, keeping the destination's
        suffixes (``.nii.gz``) so that libraries choosing a format by name still do the right
        thing. Write to it; on normal exit it replaces ``path``, on an exception it is deleted.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes[-2:]) if final.name.endswith(".nii.gz") else final.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.",
                                    suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``; return ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (parents created); return the path."""
    def _write(tmp: Path) -> None:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, _write)


def _to_jsonable(obj: Any) -> Any:
    """``json.dumps`` default: numpy scalars/arrays, torch tensors and paths become plain JSON."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _finite_or_null(obj: Any) -> Any:
    """Replace non-finite floats by None (``null``): NaN/Infinity are not valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _finite_or_null(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically; return the path.

    numpy/torch values become plain numbers and lists; non-finite floats become ``null`` because
    NaN/Infinity are not JSON and strict readers (jq, JavaScript) reject them.
    """
    text = json.dumps(_finite_or_null(obj), indent=indent, default=_to_jsonable,
                      allow_nan=False) + "\n"
    return atomic_write_text(path, text)
