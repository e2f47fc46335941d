"""Many participants: the summary TSV, progress lines and the engines that run them.

Subjects run in a ``concurrent.futures`` thread pool here (each thread waits on its subject's
process) or as tasks of a Dask distributed cluster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qsmnet.cohort.subjects import (
    SubjectResult,
    run_subject,
    select_participants,
    subject_state,
)
from qsmnet.io.atomic import atomic_write_text
from qsmnet.io.errors import QSMInputError

__all__ = ["SUMMARY_COLUMNS", "SUMMARY_NAME", "run_bids_app"]

log = logging.getLogger("qsmnet")

SUMMARY_NAME = "qsmnet_summary.tsv"
SUMMARY_COLUMNS = ("participant_id", "status", "runtime_s", "error")
_NA = "n/a"  # BIDS's value for a missing entry in a TSV file


def _check_folders(bids_dir: Path, out_dir: Path) -> None:
    if not bids_dir.is_dir():
        raise QSMInputError(f"{os.fspath(bids_dir)}: folder not found (BIDS_DIR)")
    if out_dir.exists() and not out_dir.is_dir():
        raise QSMInputError(f"{os.fspath(out_dir)}: exists and is not a folder (OUTPUT_DIR)")
    if out_dir.resolve() == bids_dir.resolve():
        raise QSMInputError(f"{os.fspath(out_dir)}: OUTPUT_DIR must not be BIDS_DIR itself "
                            "(use e.g. BIDS_DIR/derivatives/qsmnet)")


class _Summary:
    """The summary TSV, rewritten atomically as results arrive, and the progress lines."""

    def __init__(self, out_dir: Path, labels: Sequence[str]) -> None:
        self.path = out_dir / SUMMARY_NAME
        self.results: dict[str, SubjectResult | None] = dict.fromkeys(labels)
        self.finished = 0

    def add(self, result: SubjectResult) -> None:
        self.results[result.label] = result
        self.finished += 1
        took = f" in {result.runtime_s:.1f} s" if result.runtime_s is not None else ""
        why = f": {result.error}" if result.error else ""
        log.info("[%d/%d] sub-%s %s%s%s", self.finished, len(self.results), result.label,
                 result.status, took, why)
        self.write()

    def write(self) -> None:
        rows = ["\t".join(SUMMARY_COLUMNS)]
        for label, res in self.results.items():
            if res is None:
                rows.append(f"sub-{label}\tpending\t{_NA}\t{_NA}")
                continue
            runtime = f"{res.runtime_s:.2f}" if res.runtime_s is not None else _NA
            error = " ".join(res.error.split()) or _NA
            rows.append(f"sub-{label}\t{res.status}\t{runtime}\t{error}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "\n".join(rows) + "\n")


def _failed(label: str, exc: BaseException) -> SubjectResult:
    return SubjectResult(label, "failed", None, f"{type(exc).__name__}: {exc}")


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (cgroups, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _run_local(tasks: list[dict], jobs: int, report: Callable[[SubjectResult], None]) -> None:
    # Threads suffice: each one only waits on its subject's process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_subject, **task): task["label"] for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            try:
                report(future.result())
            except Exception as exc:  # noqa: BLE001 - e.g. the log could not be written
                report(_failed(futures[future], exc))


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise QSMInputError("--dask-scheduler: needs the optional dependency dask.distributed "
                            "(pip install 'qsmnet[cluster]'): "
                            f"{type(exc).__name__}: {exc}") from exc
    return distributed


def _run_dask(tasks: list[dict], address: str, report: Callable[[SubjectResult], None]) -> None:
    distributed = _import_distributed()
    try:
        client = distributed.Client(address, timeout=30)
    except OSError as exc:
        raise QSMInputError(f"--dask-scheduler: cannot reach {address} ({exc})") from exc
    with client:
        futures = {client.submit(run_subject, **task, pure=False,
                                 key=f"qsmnet-sub-{task['label']}-{os.getpid()}-{time.time_ns()}"):
                   task["label"] for task in tasks}
        for future in distributed.as_completed(futures):
            try:
                report(future.result())
            except Exception as exc:  # noqa: BLE001 - a worker lost, a task cancelled
                report(_failed(futures[future], exc))


def _tasks(args: argparse.Namespace, bids_dir: Path, out_dir: Path, labels: Sequence[str],
           summary: _Summary) -> list[dict]:
    overwrite = "--overwrite" in args.predict_args
    if args.threads_per_subject is not None:
        threads = args.threads_per_subject
    else:
        threads = 1 if args.dask_scheduler else max(1, _available_cpus() // args.jobs)
    states = {label: "new" if overwrite else subject_state(bids_dir, out_dir, label)
              for label in labels}
    done = [label for label, state in states.items() if state == "done"]
    log.info("%d participant(s): %d to reconstruct, %d done before", len(labels),
             len(labels) - len(done), len(done))
    for label in done:
        summary.add(SubjectResult(label, "skipped"))
    tasks = []
    for label, state in states.items():
        if state == "done":
            continue
        if state == "partial":
            log.info("sub-%s: part of its outputs exist (an interrupted run); redoing it with "
                     "--overwrite", label)
        tasks.append(dict(bids_dir=os.fspath(bids_dir), out_dir=os.fspath(out_dir), label=label,
                          predict_args=list(args.predict_args), threads=threads,
                          overwrite=state == "partial"))
    return tasks


def run_bids_app(args: argparse.Namespace) -> int:
    """Handler of the BIDS-App form (arguments from :func:`parse_bids_app`).

    Returns 0 when no subject failed, 1 otherwise (the summary TSV says which and why).
    """
    if args.jobs < 1:
        raise QSMInputError(f"--jobs: {args.jobs} must be at least 1")
    if args.threads_per_subject is not None and args.threads_per_subject < 1:
        raise QSMInputError(f"--threads-per-subject: {args.threads_per_subject} must be at "
                            "least 1")
    bids_dir, out_dir = Path(args.bids_dir).absolute(), Path(args.output_dir).absolute()
    _check_folders(bids_dir, out_dir)
    labels = select_participants(bids_dir, args.participant_label)
    if args.dask_scheduler:
        _import_distributed()  # a missing extra is reported before anything is written
    summary = _Summary(out_dir, labels)
    summary.write()
    tasks = _tasks(args, bids_dir, out_dir, labels, summary)
    if tasks and args.dask_scheduler:
        _run_dask(tasks, args.dask_scheduler, summary.add)
    elif tasks:
        _run_local(tasks, args.jobs, summary.add)
    failed = [label for label, res in summary.results.items() if res and res.status == "failed"]
    log.info("summary: %s%s", summary.path,
             f" ({len(failed)} failed: {', '.join(f'sub-{f}' for f in failed)})" if failed else "")
    return 1 if failed else 0
