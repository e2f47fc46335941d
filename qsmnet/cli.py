"""The ``qsmnet`` command line: simulate, predict, run-stage, evaluate, convert.

Every user error (bad argument, missing file, bad NIfTI, inconsistent metadata) ends as exactly
one line on stderr, ``qsmnet: error: ...``, and exit code 2, before anything is written; add
``--verbose`` for the traceback. Given paths are checked here, before any handler is imported, so
that a typo costs neither a model load nor a half-filled output folder.

Handlers are imported lazily inside each subcommand, so that one subcommand's heavy imports
(qsm-ci, the simulator, the network weights) never slow down or break another, nor ``qsmnet
--help``. The names of the inversions and background removals are read from the modules that
define them (one list each).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from pathlib import Path

from qsmnet import __version__
from qsmnet.allocator import keep_large_buffers_in_heap
from qsmnet.inference.dipole import CLASSICAL_METHODS, TFI_METHOD
from qsmnet.inference.reference import (
    CSF_EROSION_MM,
    CSF_R2STAR_MAX_PER_S,
    DEFAULT_REFERENCE,
    REFERENCES,
)
from qsmnet.io.errors import QSMInputError
from qsmnet.io.fieldmap import FIELDMAP_UNITS
from qsmnet.io.qsmci import QSMCI_INPUTS, QSMCI_STAGES
from qsmnet.io.phase import PHASE_UNITS
from qsmnet.io.validate import check_b0_dir, check_b0_t, check_te_s
from qsmnet.transforms.background import BFR_METHODS
from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM
from qsmnet.transforms.reliability import DEFAULT_MAX_PHASE_STEP_RAD
from qsmnet.transforms.tfi import TFI_DEFAULTS

__all__ = ["BUILTIN_METHODS", "DEVICES", "build_parser", "main"]

PROG = "qsmnet"
#: Reconstruction methods known by name; anything else given to --method must be a checkpoint.
BUILTIN_METHODS = ("unet", *CLASSICAL_METHODS, TFI_METHOD)
DEVICES = ("cpu", "cuda", "auto")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("qsmnet")


class _Unavailable(Exception):
    """A subcommand's implementation could not be imported (exit 1, one line)."""


class _UsageError(Exception):
    """An argparse error, carried to :func:`main` so that it prints one line, not usage + error."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D102 - argparse API
        sub = self.prog[len(PROG):].strip()
        raise _UsageError(f"{sub}: {message}" if sub else message)


def _formatter(prog: str) -> argparse.HelpFormatter:
    # Raw so that epilog examples keep their lines; descriptions are wrapped by _wrap instead.
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=88)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's --verbose must not reset one given before the subcommand.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, and tracebacks on errors")


def _add_method_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="unet", metavar=f"{{{','.join(BUILTIN_METHODS)}}}|CKPT",
                   help="reconstruction: the bundled network (unet), a classical baseline "
                        "(tkd, l2 = closed-form Tikhonov, tv = total variation with the data term on "
                        "the brain mask), tfi = the chi of the total-field inversion itself (with "
                        "--bfr tfi) or the path of a "
                        "trained checkpoint (default: %(default)s)")
    p.add_argument("--dc-iterations", type=int, default=None, metavar="N",
                   help="test-time data-consistency iterations after the inversion (default: "
                        "what the model card recommends for a network: for the shipped model 40 "
                        "on a given local field (run-stage dipole) and 0 on a local field from "
                        "background removal (predict, run-stage end-to-end), where the "
                        "refinement would fit background-removal errors; 0 for tkd/l2/tv)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to run; auto = cuda when available, else cpu (default: %(default)s)")
    p.add_argument("--max-phase-step", type=float, default=DEFAULT_MAX_PHASE_STEP_RAD,
                   metavar="RAD",
                   help="from phase: voxels whose field jumps by more than this phase (rad, at the "
                        "spatially unwrapped echo) from a neighbour are unreliable (2pi aliasing "
                        "next to air) and kept out of background removal; 0 turns the test off "
                        "(default: pi/2)")
    p.add_argument("--field-margin", type=float, default=DEFAULT_FIELD_MARGIN_MM, metavar="MM",
                   help="from phase: field mapping, background removal and the inversion also use "
                        "the voxels up to this far (mm) outside the brain mask whose magnitude is "
                        "at least a quarter of the brain's median (the CSF rim), so that the "
                        "brain's own field near its edge is not taken for background; chi is "
                        "reported on the brain mask; 0 uses the brain mask alone "
                        "(default: %(default)s)")
    p.add_argument("--bfr", default="tfi", choices=sorted(BFR_METHODS, key=lambda m: m != "tfi"),
                   help="background-field removal (default: %(default)s; tfi, a total-field "
                        "inversion, fits chi of the brain and of a band around it to the total "
                        "field and returns the field of the brain's part, on the whole mask; "
                        "pdf keeps the whole mask, vsharp/resharp/vresharp erode it; vresharp "
                        "is V-SHARP's variable radius with RESHARP's regularised solve; lbv, "
                        "the Laplacian boundary value method, returns the mask less its outer "
                        "layers)")
    p.add_argument("--tfi-iterations", type=int, nargs=2, default=None,
                   metavar=("OUTER", "CG"),
                   help="with --bfr tfi: TV reweighting steps, and conjugate-gradient "
                        "iterations in each (time grows with their product; default: "
                        f"{TFI_DEFAULTS['outer_iterations']} {TFI_DEFAULTS['cg_iterations']})")


def _add_phase_sign(p: argparse.ArgumentParser, from_sidecar: bool = False) -> None:
    # from_sidecar: default None, so that the BIDS reader can tell an explicit sign from none
    # and take GE's from the sidecar's Manufacturer.
    p.add_argument("--phase-sign", type=int, choices=(1, -1), default=None if from_sidecar else 1,
                   help="phase polarity: 1 if phase grows with positive field, -1 for "
                        "the opposite vendor convention (default: 1" +
                        ("; with --bids, -1 when the sidecar's Manufacturer is GE)" if from_sidecar
                         else ")"))


def _add_output_checks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's outputs in the output folder (default: stop "
                        "before computing when they exist)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the estimated peak memory exceeds the memory "
                        "available (default: stop before computing, with both figures)")


def _add_input_checks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase-units", choices=PHASE_UNITS, default="auto",
                   help="units of the phase images: auto recognises radians, degrees and "
                        "integer raw phase by the range the values fill (and says what it "
                        "assumed), rad/deg/int force one (default: %(default)s)")
    p.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                   help="binarise the mask: inside where value > T (default: the mask must "
                        "hold integers, 0 outside, nonzero inside; a fractional mask such as "
                        "a probability map is refused)")
    p.add_argument("--no-decay-check", action="store_true",
                   help="accept multi-echo magnitude that grows from the first to the last echo "
                        "(refused by default: T2* decay makes it fall; echoes in reverse order)")


def _check_input_flags(args: argparse.Namespace) -> None:
    threshold = getattr(args, "mask_threshold", None)
    if threshold is not None and not math.isfinite(threshold):
        raise QSMInputError(f"--mask-threshold: {threshold} is not a finite number")


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate", help="write a simulated multi-echo GRE subject (BIDS) with its ground truth",
        description=_wrap(
            "Simulate a head-like susceptibility phantom, its field and a multi-echo GRE "
                    "acquisition, and write it as a BIDS subject (phase/magnitude per echo with "
                    "JSON sidecars) plus the ground truth under derivatives/. Options left out "
                    "take the simulator's defaults."),
        epilog="example:\n  qsmnet simulate --out bids/ --subject 01 --shape 64 64 48 "
               "--b0-dir 0.2 0 1 --te 0.004 0.012 0.020",
        formatter_class=_formatter)
    _add_common(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="BIDS root to write into")
    p.add_argument("--subject", default="01", metavar="ID", help="subject label (default: 01)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="volume shape")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("DX", "DY", "DZ"),
                   help="voxel size, mm")
    p.add_argument("--b0-dir", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="B0 direction in array axes (normalised)")
    p.add_argument("--b0", type=float, metavar="T", help="field strength, tesla")
    p.add_argument("--te", type=float, nargs="+", metavar="S", help="echo times, seconds")
    p.add_argument("--snr", type=float, metavar="SNR", help="peak signal-to-noise ratio")
    p.set_defaults(handler=_run_simulate)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="reconstruct susceptibility maps from BIDS or NIfTI phase",
        description=_wrap(
            "Reconstruct chi (ppm) from multi-echo GRE phase. Input is a BIDS dataset "
                    "(--bids; echo times and field strength from the JSON sidecars) or NIfTI "
                    "files (--phase/--magnitude with --params or --te/--b0), or a total field "
                    "map in Hz or ppm (--fieldmap with --mask; background removal and the "
                    "inversion only). Outputs keep the input's grid, affine and orientation."),
        epilog="examples:\n"
               "  qsmnet predict --bids bids/ --subject 01\n"
               "  qsmnet predict --phase ph.nii.gz --magnitude mag.nii.gz --te 0.004 0.008 "
               "--b0 3 --out out/\n"
               "  qsmnet predict --phase e1.nii.gz e2.nii.gz --magnitude m1.nii.gz m2.nii.gz "
               "--params params.json --mask mask.nii.gz --method tv --out out/\n"
               "  qsmnet predict --fieldmap b0_hz.nii.gz --params params.json "
               "--mask mask.nii.gz --out out/",
        formatter_class=_formatter)
    _add_common(p)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--bids", type=Path, metavar="ROOT", help="BIDS dataset folder")
    src.add_argument("--phase", type=Path, nargs="+", metavar="FILE",
                     help="phase: one 4-D NIfTI (echoes last) or one 3-D NIfTI per echo")
    src.add_argument("--fieldmap", type=Path, metavar="FILE",
                     help="total field map, unwrapped and combined over echoes (a scanner B0 map, "
                          "ROMEO's B0): one 3-D NIfTI; needs --mask, and --params or --b0 for Hz; "
                          "starts at background removal")
    bids = p.add_argument_group("BIDS options")
    bids.add_argument("--subject", nargs="+", metavar="ID",
                      help="subjects to process (default: all with MEGRE phase)")
    nii = p.add_argument_group("NIfTI options")
    nii.add_argument("--magnitude", type=Path, nargs="+", metavar="FILE",
                     help="magnitude, same layout as --phase")
    nii.add_argument("--params", type=Path, metavar="params.json",
                     help='QSM-CI params.json {"TE": [s...], "B0": T, "B0_dir": [x,y,z], '
                          '"voxel_size": [mm,mm,mm]}')
    nii.add_argument("--te", type=float, nargs="+", metavar="S", help="echo times, seconds")
    nii.add_argument("--fieldmap-units", choices=FIELDMAP_UNITS, default=None,
                     help="units of --fieldmap: hz (converted with B0) or ppm (default: hz)")
    nii.add_argument("--b0", type=float, metavar="T", help="field strength, tesla")
    nii.add_argument("--b0-dir", type=float, nargs=3, metavar=("X", "Y", "Z"),
                     help="B0 direction in array axes (default: from the affine)")
    p.add_argument("--mask", type=Path, metavar="FILE",
                   help="brain mask on the phase grid (with --bids: a file, or 'derivatives' to "
                        "use derivatives/*/sub-<id>/anat/*_mask.nii*)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (required for NIfTI input; BIDS default: "
                        "ROOT/derivatives/qsmnet)")
    _add_method_device(p)
    _add_phase_sign(p, from_sidecar=True)
    _add_input_checks(p)
    _add_output_checks(p)
    p.add_argument("--no-preview", action="store_true", help="do not write PNG previews")
    _add_reference_roi(p)
    p.set_defaults(handler=_run_predict)


def _add_reference_roi(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reference and regions of interest")
    g.add_argument("--reference", choices=REFERENCES, default=DEFAULT_REFERENCE,
                   help="what chi is referenced to: its mean in the mask (default), the mean "
                        f"over ventricular CSF (R2* < {CSF_R2STAR_MAX_PER_S:g} 1/s in the brain "
                        f"eroded by {CSF_EROSION_MM:g} mm, connected regions at its centre; "
                        "needs magnitude), or none")
    g.add_argument("--roi", type=Path, metavar="LABELS",
                   help="label image on the phase grid: writes chi mean/median/std and voxel "
                        "counts per label (*_desc-roi_stats.tsv) with the outputs")
    g.add_argument("--roi-names", type=Path, metavar="TABLE",
                   help="label names for --roi: BIDS dseg.tsv (index, name columns) or "
                        "'index name' lines (FreeSurfer LUT)")


def _add_run_stage(sub) -> None:
    p = sub.add_parser(
        "run-stage", help="run one QSM-CI stage on a canonical input folder",
        description=_wrap("Run a QSM-CI stage: read IN_DIR's canonical files (phase.nii.gz, "
                    "magnitude.nii.gz, mask.nii.gz, totalfield.nii.gz, localfield.nii.gz, "
                    "params.json) and write the stage's output (totalfield.nii.gz, "
                    "localfield.nii.gz or chimap.nii.gz, ppm) to OUT_DIR."),
        epilog="stages:\n"
               "  field-mapping  phase, magnitude, mask, params -> totalfield\n"
               "  bfr            totalfield, mask, params       -> localfield\n"
               "  dipole         localfield, mask, params       -> chimap\n"
               "  end-to-end     phase, magnitude, mask, params -> chimap",
        formatter_class=_formatter)
    _add_common(p)
    p.add_argument("stage", choices=QSMCI_STAGES, metavar="STAGE",
                   help=f"one of {', '.join(QSMCI_STAGES)}")
    p.add_argument("in_dir", type=Path, metavar="IN_DIR", help="input folder")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output folder")
    _add_method_device(p)
    _add_phase_sign(p)
    _add_input_checks(p)
    _add_output_checks(p)
    p.set_defaults(handler=_run_stage)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score a chi map against the truth with the QSM-CI metrics",
        description=_wrap("Compare PRED with TRUTH inside MASK using the QSM-CI scorer (NRMSE, "
                    "detrended NRMSE, HFEN, XSIM, CC). Both maps in ppm on the same grid."),
        formatter_class=_formatter)
    _add_common(p)
    p.add_argument("pred", type=Path, metavar="PRED", help="predicted map (NIfTI, ppm)")
    p.add_argument("truth", type=Path, metavar="TRUTH", help="ground-truth map (NIfTI, ppm)")
    p.add_argument("mask", type=Path, metavar="MASK", help="evaluation mask (NIfTI)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--erode-mm", type=float, default=3.0, metavar="R",
                   help="also score inside the mask eroded by R mm (default: %(default)s; "
                        "0 scores the mask only)")
    p.set_defaults(handler=_run_evaluate)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert multi-echo GRE DICOM series into a BIDS subject (dcm2niix)",
        description=_wrap(
            "Convert the multi-echo gradient-echo magnitude and phase DICOM series under "
            "DICOM_DIR with dcm2niix into BIDS_ROOT/sub-<id>/[ses-<s>/]anat/"
            "sub-<id>_echo-<n>_part-{mag,phase}_MEGRE.nii.gz with JSON sidecars, as "
            "'predict --bids' reads them. The subject appears complete or not at all."),
        epilog="example:\n  qsmnet convert dicom/ bids/ --subject 01\n"
               "  qsmnet predict --bids bids/ --subject 01",
        formatter_class=_formatter)
    _add_common(p)
    p.add_argument("dicom_dir", type=Path, metavar="DICOM_DIR",
                   help="folder holding the DICOM files (searched recursively)")
    p.add_argument("bids_root", type=Path, metavar="BIDS_ROOT", help="BIDS dataset folder")
    p.add_argument("--subject", default="01", metavar="LABEL",
                   help="subject label (default: %(default)s)")
    p.add_argument("--session", default=None, metavar="LABEL", help="session label (optional)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the subject's (session's) existing MEGRE files")
    p.set_defaults(handler=_run_convert)


def build_parser() -> argparse.ArgumentParser:
    """The ``qsmnet`` argument parser with its subcommands."""
    parser = _Parser(
        prog=PROG,
        description=_wrap(
            "qsmnet: physics-informed deep-learning Quantitative Susceptibility Mapping. "
                    "Fields and susceptibility are in ppm, echo times in s, B0 in T, voxel sizes "
                    "in mm."),
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
        formatter_class=_formatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="debug logging, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                parser_class=_Parser)
    sub.required = True
    _add_simulate(sub)
    _add_predict(sub)
    _add_run_stage(sub)
    _add_evaluate(sub)
    _add_convert(sub)
    return parser


# ---------------------------------------------------------------------------------------------
# Validation done before dispatch (nothing is read in full, nothing is written)
# ---------------------------------------------------------------------------------------------

def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise QSMInputError(f"{os.fspath(path)}: file not found ({what})")
    if not path.is_file():
        raise QSMInputError(f"{os.fspath(path)}: not a file ({what})")


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise QSMInputError(f"{os.fspath(path)}: folder not found ({what})")
    if not path.is_dir():
        raise QSMInputError(f"{os.fspath(path)}: not a folder ({what})")


def _check_out_dir(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise QSMInputError(f"{os.fspath(path)}: exists and is not a folder ({what})")


def _check_method(method: str) -> None:
    if method in BUILTIN_METHODS:
        return
    if not Path(method).is_file():
        raise QSMInputError(f"--method: {method!r} is neither one of "
                            f"{', '.join(BUILTIN_METHODS)} nor an existing checkpoint file")


def _check_bids_subjects(root: Path, subjects: Sequence[str] | None) -> None:
    """Named subjects must have a folder; without names, at least one subject must qualify."""
    from qsmnet.io.bids import find_bids_subjects

    if subjects:
        for subject in subjects:
            label = subject.removeprefix("sub-")
            if not label.isalnum():
                raise QSMInputError(f"--subject: {subject!r} is not a BIDS label "
                                    "(letters and digits)")
            if not (root / f"sub-{label}").is_dir():
                raise QSMInputError(f"{os.fspath(root / f'sub-{label}')}: subject folder not "
                                    "found (--subject)")
    elif not find_bids_subjects(root):
        raise QSMInputError(f"{os.fspath(root)}: no sub-*/[ses-*/]anat/"
                            "*_echo-<n>_part-phase_MEGRE.nii[.gz] files (--bids)")


def _validate_fieldmap(args: argparse.Namespace) -> None:
    """``predict --fieldmap``: a mask and (for Hz) B0 required; phase-only inputs refused."""
    unused = {"--subject": args.subject, "--magnitude": args.magnitude, "--te": args.te}
    given = [k for k, v in unused.items() if v is not None]
    if given:
        raise QSMInputError(f"{given[0]}: not used with --fieldmap (a field map needs no echo "
                            "times or magnitude)")
    if args.out is None:
        raise QSMInputError("--out: required with --fieldmap")
    if args.mask is None:
        raise QSMInputError("--mask: required with --fieldmap (background removal needs the "
                            "brain mask)")
    if args.reference == "csf":
        raise QSMInputError("--reference csf: needs the multi-echo magnitude, which --fieldmap "
                            "input has not; use mask-mean or none")
    if args.params is not None:
        both = [k for k, v in (("--b0", args.b0), ("--b0-dir", args.b0_dir)) if v is not None]
        if both:
            raise QSMInputError(f"{both[0]}: give either --params or --b0[/--b0-dir]")
        _require_file(args.params, "--params")
    else:
        if args.b0 is None and args.fieldmap_units != "ppm":
            raise QSMInputError("--b0 (or --params with B0) is required with --fieldmap in Hz "
                                "(to convert Hz to ppm)")
        if args.b0 is not None:
            check_b0_t(args.b0, "--b0")
        if args.b0_dir is not None:
            check_b0_dir(args.b0_dir, "--b0-dir")
    _require_file(args.fieldmap, "--fieldmap")
    _require_file(args.mask, "--mask")


def _validate_predict(args: argparse.Namespace) -> None:
    inputs = [k for k, v in (("--bids", args.bids), ("--phase", args.phase),
                             ("--fieldmap", args.fieldmap)) if v is not None]
    if len(inputs) != 1:
        raise QSMInputError("predict: give exactly one input, --bids ROOT or --phase FILE ... "
                            "or --fieldmap FILE" + (f" (got {' and '.join(inputs)})"
                                                   if inputs else ""))
    if args.fieldmap_units is not None and args.fieldmap is None:
        raise QSMInputError("--fieldmap-units: only used with --fieldmap FILE")
    nifti_only = {"--magnitude": args.magnitude, "--params": args.params, "--te": args.te,
                  "--b0": args.b0, "--b0-dir": args.b0_dir}
    if args.fieldmap is not None:
        _validate_fieldmap(args)
    elif args.bids is not None:
        given = [k for k, v in nifti_only.items() if v is not None]
        if given:
            raise QSMInputError(f"{given[0]}: not used with --bids (the BIDS sidecars give the "
                                "acquisition parameters)")
        _require_dir(args.bids, "--bids")
        _check_bids_subjects(args.bids, args.subject)
        if args.mask is not None and os.fspath(args.mask) != "derivatives":
            _require_file(args.mask, "--mask")
    else:
        if args.subject is not None:
            raise QSMInputError("--subject: only used with --bids")
        if args.out is None:
            raise QSMInputError("--out: required with --phase")
        if args.magnitude is None:
            raise QSMInputError("--magnitude: required with --phase")
        if len(args.magnitude) != len(args.phase):
            raise QSMInputError(f"--magnitude: {len(args.magnitude)} file(s) for "
                                f"{len(args.phase)} phase file(s)")
        if args.params is not None:
            both = [k for k in ("--te", "--b0", "--b0-dir") if nifti_only[k] is not None]
            if both:
                raise QSMInputError(f"{both[0]}: give either --params or --te/--b0[/--b0-dir]")
        else:
            if args.te is None or args.b0 is None:
                raise QSMInputError("--te and --b0 (or --params) are required with --phase")
            check_te_s(args.te, "--te")
            check_b0_t(args.b0, "--b0")
            if args.b0_dir is not None:
                check_b0_dir(args.b0_dir, "--b0-dir")
        for path in args.phase:
            _require_file(path, "--phase")
        for path in args.magnitude:
            _require_file(path, "--magnitude")
        if args.params is not None:
            _require_file(args.params, "--params")
        if args.mask is not None:
            _require_file(args.mask, "--mask")
    if args.out is not None:
        _check_out_dir(args.out, "--out")
    if args.roi is not None:
        _require_file(args.roi, "--roi")
    if args.roi_names is not None:
        if args.roi is None:
            raise QSMInputError("--roi-names: only used with --roi LABELS")
        _require_file(args.roi_names, "--roi-names")
    _check_method(args.method)
    _check_input_flags(args)


def _validate_run_stage(args: argparse.Namespace) -> None:
    _require_dir(args.in_dir, "IN_DIR")
    for filename, required in QSMCI_INPUTS[args.stage] + (("params.json", True),):
        if required:
            _require_file(args.in_dir / filename, f"the {args.stage} stage needs it")
    _check_out_dir(args.out_dir, "OUT_DIR")
    _check_method(args.method)
    _check_input_flags(args)


def _validate_evaluate(args: argparse.Namespace) -> None:
    _require_file(args.pred, "PRED")
    _require_file(args.truth, "TRUTH")
    _require_file(args.mask, "MASK")
    if not args.erode_mm >= 0:
        raise QSMInputError(f"--erode-mm: {args.erode_mm} must be >= 0 (mm)")
    if args.json is not None and args.json.is_dir():
        raise QSMInputError(f"{os.fspath(args.json)}: is a folder (--json needs a file name)")


def _validate_simulate(args: argparse.Namespace) -> None:
    _check_out_dir(args.out, "--out")
    if not args.subject.removeprefix("sub-").isalnum():
        raise QSMInputError(f"--subject: {args.subject!r} is not a BIDS label (letters and digits)")
    from qsmnet.simulation.config import MIN_SIMULATED_VOXELS

    if args.shape is not None and min(args.shape) < MIN_SIMULATED_VOXELS:
        # the simulator's own minimum, checked before anything is imported or written
        raise QSMInputError(f"--shape: {args.shape} must have at least {MIN_SIMULATED_VOXELS} "
                            "voxels per axis")
    if args.voxel_size is not None and not min(args.voxel_size) > 0:
        raise QSMInputError(f"--voxel-size: {args.voxel_size} must be positive (mm)")
    if args.b0_dir is not None:
        check_b0_dir(args.b0_dir, "--b0-dir")
    if args.b0 is not None:
        check_b0_t(args.b0, "--b0")
    if args.te is not None:
        check_te_s(args.te, "--te")
    if args.snr is not None and not args.snr > 0:
        raise QSMInputError(f"--snr: {args.snr} must be positive")


# ---------------------------------------------------------------------------------------------
# Handlers (lazy imports)
# ---------------------------------------------------------------------------------------------

def _load(module: str, attr: str, command: str):
    """Import ``module.attr`` for ``command``; an import failure becomes one clear line."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise _Unavailable(f"{command}: cannot load {module}.{attr} "
                           f"({type(exc).__name__}: {exc})") from exc


def _run_simulate(args: argparse.Namespace) -> int | None:
    _validate_simulate(args)
    write_simulated_subject = _load("qsmnet.simulation.bids", "write_simulated_subject",
                                    "simulate")
    optional = {"shape": args.shape, "voxel_size_mm": args.voxel_size, "b0_dir": args.b0_dir,
                "b0_t": args.b0, "te_s": args.te, "peak_snr": args.snr}
    # Options left out take the simulator's own defaults (one place to change them).
    kwargs = {k: (tuple(v) if isinstance(v, list) else v)
              for k, v in optional.items() if v is not None}
    result = write_simulated_subject(args.out, subject=args.subject, seed=args.seed, **kwargs)
    log.info("simulated sub-%s under %s", args.subject.removeprefix("sub-"), args.out)
    return result if isinstance(result, int) else None


def _run_predict(args: argparse.Namespace) -> int | None:
    _validate_predict(args)
    return _load("qsmnet.inference.predict", "run_predict", "predict")(args)


def _run_stage(args: argparse.Namespace) -> int | None:
    _validate_run_stage(args)
    return _load("qsmnet.inference.stages", "run_stage_cli", "run-stage")(args)


def _run_evaluate(args: argparse.Namespace) -> int | None:
    _validate_evaluate(args)
    return _load("qsmnet.metrics.evaluate", "run_evaluate_cli", "evaluate")(args)


def _run_convert(args: argparse.Namespace) -> int | None:
    _require_dir(args.dicom_dir, "DICOM_DIR")
    _check_out_dir(args.bids_root, "BIDS_ROOT")
    return _load("qsmnet.io.dicom", "run_convert_cli", "convert")(args)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qsmnet`` command line; return the exit code.

    0 on success (or ``--help``), 2 for bad input or arguments (one ``qsmnet: error:`` line on
    stderr), 1 for an unexpected failure, 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_large_buffers_in_heap()
    verbose = "-v" in argv or "--verbose" in argv
    handler = logging.StreamHandler(sys.stderr)  # the stderr of *this* call (pytest swaps it)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        try:
            from qsmnet.cohort import is_bids_app_call, parse_bids_app

            # BIDS-App form: qsmnet BIDS_DIR OUTPUT_DIR participant [options]
            args = (parse_bids_app(argv) if is_bids_app_call(argv)
                    else build_parser().parse_args(argv))
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        verbose = bool(getattr(args, "verbose", False)) or verbose
        code = args.handler(args)
        return EXIT_OK if code is None else int(code)
    except _UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (QSMInputError, FileNotFoundError, ValueError) as exc:
        if verbose:
            traceback.print_exc()
        _error(str(exc) if not isinstance(exc, FileNotFoundError) or not exc.filename
               else f"{exc.filename}: {exc.strerror or 'file not found'}")
        return EXIT_USAGE
    except _Unavailable as exc:
        if verbose:
            traceback.print_exc()
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback on request
        if verbose:
            traceback.print_exc()
        _error(f"{type(exc).__name__}: {exc}" + ("" if verbose else
                                                 " (run with --verbose for the traceback)"))
        return EXIT_FAILURE
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
