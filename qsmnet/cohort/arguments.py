"""The BIDS-App command line: recognise it, parse its own options, check the rest."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from qsmnet.io.errors import QSMInputError

__all__ = ["ANALYSIS_LEVELS", "build_bids_app_parser", "is_bids_app_call", "parse_bids_app"]

ANALYSIS_LEVELS = ("participant",)
#: Options that name the input and output of ``predict``; the BIDS-App form sets them itself.
_SET_PER_SUBJECT = ("--bids", "--subject", "--out", "--phase", "--magnitude", "--params",
                    "--te", "--b0", "--b0-dir")


def _commands() -> set[str]:
    from qsmnet.cli import build_parser

    for action in build_parser()._actions:  # the subcommands, whatever they are today
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def is_bids_app_call(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is the BIDS-App form ``BIDS_DIR OUTPUT_DIR LEVEL ...``.

    It is when its first word (after ``-v``) is not a subcommand and either its third word is
    an analysis level or its first word is an existing folder (so that a missing level is
    reported as such rather than as an unknown command).
    """
    words = list(argv)
    while words and words[0] in ("-v", "--verbose"):
        words = words[1:]
    if not words or words[0].startswith("-") or words[0] in _commands():
        return False
    return (len(words) >= 3 and words[2] in (*ANALYSIS_LEVELS, "group")) or Path(words[0]).is_dir()


def build_bids_app_parser() -> argparse.ArgumentParser:
    """The parser of the BIDS-App form (its own options; the rest goes to ``predict``)."""
    from qsmnet.cli import PROG, _formatter, _Parser

    p = _Parser(
        prog=PROG, allow_abbrev=False, formatter_class=_formatter,
        usage=f"{PROG} BIDS_DIR OUTPUT_DIR participant [--participant-label ID [ID ...]] "
              "[--jobs N | --dask-scheduler ADDRESS] [predict options]",
        description="Reconstruct every participant of a BIDS dataset into a derivative "
                    "folder, one `qsmnet predict` per subject: skips subjects already done, "
                    "goes on after a subject fails, writes OUTPUT_DIR/qsmnet_summary.tsv.",
        epilog="Any other option is passed to `qsmnet predict` for every subject (see\n"
               "`qsmnet predict --help`): --method, --bfr, --device, --field-margin,\n"
               "--dc-iterations, --mask derivatives, --overwrite, ...\n\n"
               "examples:\n"
               "  qsmnet /data/bids /data/bids/derivatives/qsmnet participant --jobs 4\n"
               "  qsmnet bids/ out/ participant --participant-label 01 02 --method tv\n"
               "  qsmnet bids/ out/ participant --dask-scheduler tcp://10.0.0.5:8786")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, and tracebacks on errors")
    p.add_argument("bids_dir", type=Path, metavar="BIDS_DIR", help="BIDS dataset folder")
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR",
                   help="derivative folder to write (not BIDS_DIR itself)")
    p.add_argument("analysis_level", choices=ANALYSIS_LEVELS, metavar="participant",
                   help="the analysis level (qsmnet works per participant)")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="ID",
                   dest="participant_label",
                   help="participants to process, with or without 'sub-' (default: all with "
                        "MEGRE phase)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="subjects at a time on this machine (default: %(default)s)")
    where.add_argument("--dask-scheduler", metavar="ADDRESS",
                       help="run the subjects as tasks of this Dask distributed scheduler "
                            "(needs qsmnet[cluster]; paths must be visible to the workers)")
    p.add_argument("--threads-per-subject", type=int, default=None, metavar="N",
                   help="torch/OpenMP threads of each subject (default: cores // --jobs "
                        "locally, 1 on Dask, whose worker threads are its cores)")
    return p


def parse_bids_app(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the BIDS-App form; ``predict_args`` holds the options passed on to ``predict``.

    The options passed on are checked once here with ``predict``'s own parser, so that a typo
    stops the run before any subject starts rather than failing every subject.
    """
    from qsmnet.cli import build_parser
    from qsmnet.cohort.study import run_bids_app

    args, rest = build_bids_app_parser().parse_known_args(list(argv))
    for word in rest:
        option = word.split("=", 1)[0]
        if option in _SET_PER_SUBJECT:
            raise QSMInputError(f"{option}: not used in the BIDS-App form (BIDS_DIR, OUTPUT_DIR "
                                "and --participant-label say what to read and write)")
    build_parser().parse_args(["predict", "--bids", os.fspath(args.bids_dir),
                               "--out", os.fspath(args.output_dir), *rest])
    args.predict_args = list(rest)
    args.handler = run_bids_app
    return args

