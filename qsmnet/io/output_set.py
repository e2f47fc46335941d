"""Whole output sets: the files of one reconstruction appear together or not at all.

Each file is already written atomically (:mod:`qsmnet.io.atomic`); this module makes the *set*
atomic, so that a failure (a full disk, an exception, a kill) never leaves a local field without
its chi map, or a JSON record naming a map that is not there:

1. :func:`check_writable` probes every output folder before anything is computed (a read-only
   folder fails in a second, not after the reconstruction).
2. :class:`FolderLock` takes an exclusive lock on each output folder for the whole run, so two
   runs writing to one folder do not mix their files: the second stops at once, naming the
   first's process. Under the lock it clears what a killed run left behind (:func:`recover`).
3. :class:`OutputSet` writes every file into a hidden staging folder beside the targets, then
   moves them into place by renames on one file system. A journal written before the first
   rename lets :func:`recover` finish a set whose moves were cut short; a staging folder
   without a journal is deleted. So a folder holds either the old set or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from qsmnet.io.atomic import atomic_write_text, remove_stale_temp_files
from qsmnet.io.errors import QSMInputError

__all__ = ["FolderLock", "OutputSet", "check_writable", "locked_folders", "recover",
           "refuse_earlier_outputs"]

STAGING_PREFIX = ".qsmnet-staging-"
LOCK_NAME = ".qsmnet.lock"
_JOURNAL = ".commit.json"


def _nearest_existing(folder: Path) -> Path:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Refuse, before any computation, an output folder that cannot be written.

    The folder may not exist yet: then its nearest existing ancestor must be a writable folder
    (it will be created there). The test writes and removes a file, which also catches
    read-only file systems and, unlike :func:`os.access`, holds for root.

    Raises
    ------
    QSMInputError
        Naming the folder and the reason (``what`` says which argument it came from).
    """
    target = Path(folder)
    base = _nearest_existing(target)
    if not base.is_dir():
        raise QSMInputError(f"{os.fspath(base)}: exists and is not a folder ({what})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qsmnet-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise QSMInputError(f"{os.fspath(target)}: cannot write output here ({reason}; "
                            f"{what})") from exc


class FolderLock:
    """Exclusive lock on an output folder for the duration of a run (``with`` block).

    The folder (and missing parents) is created; on release, folders this lock created are
    removed again if the run left them empty, so a run that failed leaves no trace.

    Raises
    ------
    QSMInputError
        On entry, when another process holds the lock (its pid is named).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> FolderLock:
        missing = []
        p = self.folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise QSMInputError(f"{os.fspath(self.folder)}: another qsmnet run (pid {owner}) "
                                    "is writing to this folder; wait for it to finish or choose "
                                    "another output folder") from exc
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        recover(self.folder)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        # unlink before unlocking: a run that opens the name later gets a fresh file
        with contextlib.suppress(FileNotFoundError):
            (self.folder / LOCK_NAME).unlink()
        os.close(self._fd)
        self._fd = None
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def _finish(staging: Path) -> None:
    """Carry out a staged set's journal: move its files in, delete the old set's leftovers."""
    journal = json.loads((staging / _JOURNAL).read_text(encoding="utf-8"))
    folder = staging.parent
    for name in journal["move"]:
        src = staging / name
        if src.exists():
            os.replace(src, folder / name)
    for name in journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def recover(folder: str | os.PathLike) -> list[str]:
    """Clear what killed runs left in ``folder`` (call it holding :class:`FolderLock`).

    A staging folder with a journal (killed while moving its files in) is finished; one without
    (killed while computing or writing) is deleted, as are the temporary files of atomic writes
    whose process is gone. Returns one line per action, for the log.
    """
    folder = Path(folder)
    done = []
    if not folder.is_dir():
        return done
    for staging in sorted(folder.glob(STAGING_PREFIX + "*")):
        if not staging.is_dir():
            continue
        if (staging / _JOURNAL).is_file():
            _finish(staging)
            done.append(f"{staging.name}: finished moving a set a killed run had written")
        else:
            shutil.rmtree(staging, ignore_errors=True)
            done.append(f"{staging.name}: removed the partial set of a killed run")
    done += [f"{name}: removed a killed run's temporary file"
             for name in remove_stale_temp_files(folder)]
    return done


def refuse_earlier_outputs(paths: Iterable[str | os.PathLike], command: str, elsewhere: str,
                           record: str | os.PathLike | None = None) -> None:
    """Refuse (before computing) to write where a file of the set exists already.

    ``record`` is the earlier set's JSON record: its method and date go into the message.
    ``elsewhere`` names the option that picks another folder. ``--overwrite`` is the way past.
    """
    found = [Path(p) for p in paths if Path(p).exists()]
    if found:
        raise QSMInputError(f"{found[0]}: exists{_made_by(record)}; {command} replaces an output "
                            f"set only with --overwrite (or write to another folder with "
                            f"{elsewhere})")


def _made_by(record: str | os.PathLike | None) -> str:
    """`` (made by --method X on DATE)`` from a JSON record, or nothing when unreadable."""
    if record is None:
        return ""
    try:
        meta = json.loads(Path(record).read_text(encoding="utf-8"))
        return f" (made by --method {meta['method']} on {meta['created']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class OutputSet:
    """Stage the files of one output set in ``folder`` and move them in together on commit.

    Use :meth:`path` for the staging path of each final file, write there, then :meth:`commit`.
    Leaving the ``with`` block by an exception discards the staged files; the folder keeps what
    it had. Hold a :class:`FolderLock` on ``folder`` meanwhile.

    Parameters
    ----------
    folder : path-like
        Where the set's files go (all of them in this one folder).
    replaces : sequence of str
        Names of files of an earlier set that this one replaces: those it does not write again
        are deleted on commit, so no stale companion stays beside the new chi map.
    """

    def __init__(self, folder: str | os.PathLike, replaces: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.replaces = tuple(replaces)
        self.staging: Path | None = None
        self._names: list[str] = []

    def __enter__(self) -> OutputSet:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.staging = self.folder / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir()
        return self

    def path(self, final: str | os.PathLike) -> Path:
        """The staging path of ``final`` (a file name, or a path in :attr:`folder`)."""
        if self.staging is None:
            raise RuntimeError("OutputSet.path outside its with block")
        final = Path(final)
        if final.parent not in (Path("."), self.folder) and final.parent.resolve() != \
                self.folder.resolve():
            raise ValueError(f"{final} is not in the output folder {self.folder}")
        if final.name not in self._names:
            self._names.append(final.name)
        return self.staging / final.name

    def commit(self, order: Sequence[str] = ()) -> list[Path]:
        """Move the staged files in (names in ``order`` last, in that order); return the final
        paths. The journal is written first, so a kill during the moves is finished by the
        next run's :func:`recover`."""
        if self.staging is None:
            raise RuntimeError("OutputSet.commit outside its with block")
        staged = [n for n in self._names if (self.staging / n).exists()]
        last = [n for n in order if n in staged]
        moves = [n for n in staged if n not in last] + last
        removes = [n for n in self.replaces if n not in moves]
        atomic_write_text(self.staging / _JOURNAL, json.dumps({"move": moves, "remove": removes}))
        _finish(self.staging)
        self.staging = None
        return [self.folder / n for n in moves]

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


@contextlib.contextmanager
def locked_folders(folders: Iterable[str | os.PathLike]) -> Iterator[list[FolderLock]]:
    """Hold a :class:`FolderLock` on each distinct folder (sorted, so two runs taking the same
    folders cannot deadlock; the second fails on the first folder it cannot lock)."""
    unique = sorted({Path(f).absolute() for f in folders})
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FolderLock(f)) for f in unique]
