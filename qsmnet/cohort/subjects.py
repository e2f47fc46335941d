"""One participant: which outputs it should have, whether they are there, and its run.

:func:`run_subject` runs in a thread of this process or in a Dask worker, so it and what it
returns stay importable and picklable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from qsmnet.io.atomic import atomic_write_text
from qsmnet.io.bids import bids_derivative_path, find_bids_subjects, parse_bids_name
from qsmnet.io.errors import QSMInputError

__all__ = ["SubjectResult", "run_subject", "select_participants", "subject_state"]

#: Thread pools a subject's process reads at start-up (torch's intra-op pool follows OpenMP's).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_ERROR_PREFIX = "qsmnet: error: "


@dataclass(frozen=True)
class SubjectResult:
    """What became of one participant.

    Attributes
    ----------
    label : str
        Participant label without ``sub-``.
    status : str
        ``done`` (reconstructed by this run), ``skipped`` (done before), ``failed``.
    runtime_s : float or None
        Wall time of the subject's ``predict`` process, s (None when skipped).
    error : str
        One line saying why it failed (empty otherwise).
    """

    label: str
    status: str
    runtime_s: float | None = None
    error: str = ""


def _expected_records(bids_dir: Path, out_dir: Path, label: str) -> list[Path]:
    """The JSON record ``predict`` writes (last) for each acquisition of ``sub-<label>``."""
    subject_dir = bids_dir / f"sub-{label}"
    phase = sorted(subject_dir.glob("anat/*_part-phase*_MEGRE.nii*"))
    phase += sorted(subject_dir.glob("ses-*/anat/*_part-phase*_MEGRE.nii*"))
    records = set()
    for path in phase:
        parsed = parse_bids_name(path.name)
        if parsed is None:
            continue
        entities = {k: v for k, v in parsed[0].items() if k not in ("echo", "part")}
        # the derivative name predict gives the acquisition these echoes belong to
        chimap = bids_derivative_path(None, SimpleNamespace(entities=entities, name=path.name),
                                      "Chimap", out_dir)
        records.add(chimap.with_name(chimap.name.replace("_Chimap.nii.gz", "_Chimap.json")))
    return sorted(records)


def _record_complete(record: Path) -> bool:
    try:
        outputs = json.loads(record.read_text(encoding="utf-8")).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return False
    return all((record.parent / name).is_file() for name in outputs.values())


def subject_state(bids_dir: str | os.PathLike, out_dir: str | os.PathLike, label: str) -> str:
    """``done``, ``partial`` (some outputs, not all) or ``new`` for ``sub-<label>``.

    Done: every acquisition's JSON record exists and every file it names exists.
    """
    bids_dir, out_dir = Path(bids_dir), Path(out_dir)
    records = _expected_records(bids_dir, out_dir, label)
    if records and all(_record_complete(r) for r in records):
        return "done"
    subject_out = out_dir / f"sub-{label}"
    if subject_out.is_dir() and any(f.is_file() and not f.name.startswith(".")
                                    for f in subject_out.rglob("*")):
        return "partial"
    return "new"


def select_participants(bids_dir: Path, labels: Sequence[str] | None) -> list[str]:
    """The labels (without ``sub-``) to process: ``labels`` in their order, or all subjects.

    Raises
    ------
    QSMInputError
        A label that is not alphanumeric or names no subject with MEGRE phase, or a dataset
        with no such subject.
    """
    available = find_bids_subjects(bids_dir)
    if not labels:
        if not available:
            raise QSMInputError(f"{os.fspath(bids_dir)}: no sub-*/[ses-*/]anat/"
                                "*_echo-<n>_part-phase_MEGRE.nii[.gz] files (BIDS_DIR)")
        return available
    chosen = []
    for label in labels:
        sub = label.removeprefix("sub-")
        if not sub.isalnum():
            raise QSMInputError(f"--participant-label: {label!r} is not a BIDS label "
                                "(letters and digits)")
        if sub not in available:
            raise QSMInputError(f"{os.fspath(bids_dir / f'sub-{sub}')}: no MEGRE phase images "
                                "for this participant (--participant-label)")
        if sub not in chosen:
            chosen.append(sub)
    return chosen


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    errors = [line[len(_ERROR_PREFIX):] for line in lines if line.startswith(_ERROR_PREFIX)]
    if errors:
        return errors[-1]
    if proc.returncode < 0:
        return f"predict was killed by signal {-proc.returncode} (out of memory?)"
    last = lines[-1] if lines else "no message"
    return f"predict exited with code {proc.returncode}: {last}"


def _write_log(out_dir: Path, label: str, command: Sequence[str], threads: int,
               proc: subprocess.CompletedProcess) -> None:
    text = (f"$ {' '.join(command)}\n# threads {threads}\n# exit code {proc.returncode}\n"
            f"# stdout\n{proc.stdout or ''}\n# stderr\n{proc.stderr or ''}")
    path = out_dir / "logs" / f"sub-{label}_predict.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def run_subject(bids_dir: str, out_dir: str, label: str, predict_args: Sequence[str],
                threads: int, overwrite: bool = False) -> SubjectResult:
    """Reconstruct ``sub-<label>`` with ``python -m qsmnet predict`` in a process of its own.

    Parameters
    ----------
    bids_dir, out_dir : str
        Absolute paths, as the machine running this sees them.
    label : str
        Participant label without ``sub-``.
    predict_args : sequence of str
        Options of ``qsmnet predict`` (already checked by its parser).
    threads : int
        torch/OpenMP/BLAS threads of the process (>= 1).
    overwrite : bool
        Add ``--overwrite`` (a subject with part of its outputs, resumed).

    Returns
    -------
    SubjectResult
        ``done`` when the process succeeded and left the complete output set, else ``failed``
        with one line saying why; never raises for a failing subject.
    """
    command = [sys.executable, "-m", "qsmnet", "predict", "--bids", bids_dir, "--subject",
               label, "--out", out_dir, *predict_args]
    if overwrite and "--overwrite" not in command:
        command.append("--overwrite")
    env = dict(os.environ, **{name: str(threads) for name in _THREAD_VARIABLES})
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    runtime_s = time.perf_counter() - t0
    _write_log(Path(out_dir), label, command, threads, proc)
    if proc.returncode != 0:
        return SubjectResult(label, "failed", runtime_s, _error_line(proc))
    if subject_state(bids_dir, out_dir, label) != "done":
        return SubjectResult(label, "failed", runtime_s,
                             f"predict succeeded but sub-{label}'s outputs are incomplete under "
                             f"{out_dir}")
    return SubjectResult(label, "done", runtime_s)

