#!/usr/bin/env python
"""The qsmnet demo (``make demo``): train briefly, simulate a subject, reconstruct it, score it.

1. A short training run of the default model on simulated phantoms (``scripts/train.py``, 60
   steps of 48^3 patches by default) to show that training works: its validation figures are
   printed beside those of the TKD first estimate the network starts from. TensorBoard logs
   go to ``<out>/train``.
2. A simulated BIDS subject with its ground truth (``qsmnet simulate``; the truths are written
   under ``<out>/bids/derivatives/qsmnet-simulation``).
3. Reconstructions from the wrapped multi-echo phase (``qsmnet predict``, end to end) with the
   shipped model (``unet``) and TV-ADMM (``tv``), each in its own folder under ``<out>/recon``.
4. The dipole inversion alone, from the simulated local field (``qsmnet run-stage dipole``),
   with the same two methods and the checkpoint just trained, under ``<out>/dipole``: the step
   the network is trained for.
5. NRMSE, HFEN and XSIM of every chi map against the simulated chi inside the simulated brain
   mask (the QSM-CI scorer's functions, :func:`qsmnet.metrics.score`), printed as a table and
   written to ``<out>/scores.json``.

Usage::

    python scripts/demo.py [--out demo] [--train-steps 60] [--patch-size 48]
    python scripts/demo.py --train-steps 0        # no training: shipped model and TV only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUBJECT = "demo"
SEED = 7
#: Marks a training folder as the demo's own, so that a rerun may replace it.
TRAIN_MARKER = ".qsmnet-demo"
#: Validation samples of the demo training (the default run uses 16 at 64^3).
VAL_SIZE = 8
#: A safety cap only: the planned steps take a few minutes even on a loaded 2-core machine, and
#: a run the cap stops is reported as such.
TRAIN_MAX_TIME = "00:00:06:00"
#: Methods reconstructed: (row name, ``--method`` value); the demo checkpoint is added after.
BUILTIN = (("unet (shipped)", "unet"), ("tv", "tv"))


class DemoError(RuntimeError):
    """A step of the demo failed; the message names it (exit code 2 or the step's code)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _say(text: str = "") -> None:
    print(text, flush=True)


def _cli(argv: Sequence[str]) -> None:
    """Run one ``qsmnet`` command in this process (one import of torch for all of them)."""
    from qsmnet.cli import main

    argv = [os.fspath(a) for a in argv]
    code = main(argv)
    if code != 0:
        raise DemoError(f"`qsmnet {' '.join(argv)}` failed (exit code {code})", code)


# ---------------------------------------------------------------------------------------------
# 1. training
# ---------------------------------------------------------------------------------------------

def prepare_train_dir(train_dir: Path) -> None:
    """Empty ``train_dir`` when an earlier demo made it (so TensorBoard shows one run); refuse a
    folder the demo did not make rather than delete someone's files."""
    if train_dir.exists():
        if not (train_dir / TRAIN_MARKER).is_file() and any(train_dir.iterdir()):
            raise DemoError(f"{train_dir}: exists and was not made by the demo; remove it or "
                            "choose another --out")
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True)
    (train_dir / TRAIN_MARKER).write_text("made by scripts/demo.py; replaced on each demo run\n",
                                          encoding="utf-8")


def train_overrides(train_dir: Path, steps: int, patch_size: int, progress: bool) -> list[str]:
    """Hydra overrides of the demo training: ``steps`` optimiser steps of ``patch_size``^3
    patches, validating three times (the last at the final step)."""
    every = max(1, steps // 3)
    out = [f"paths.output_dir={_hydra_value(train_dir)}", f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={every}", f"data.patch_size={patch_size}",
           f"data.val_size={VAL_SIZE}", f"trainer.max_time={TRAIN_MAX_TIME}",
           f"callbacks.last_checkpoint.every_n_train_steps={steps}",
           "trainer.enable_model_summary=false"]
    if not progress:
        # a log file or CI: one line per validation instead of carriage-return progress bars
        out += ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"]
    return out


def _hydra_value(path: Path) -> str:
    """``path`` as a Hydra override value (quoted when it holds characters Hydra parses)."""
    text = os.fspath(path)
    if all(c.isalnum() or c in "/._-" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_training(train_dir: Path, steps: int, patch_size: int) -> dict[str, Any]:
    """Train in a child process (Hydra owns its command line); return its ``metrics.json``."""
    import json

    train_dir = train_dir.resolve()  # the child runs in the repository root
    prepare_train_dir(train_dir)
    cmd = [sys.executable, os.fspath(REPO / "scripts" / "train.py"),
           *train_overrides(train_dir, steps, patch_size, sys.stdout.isatty())]
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO)
    elapsed_s = time.perf_counter() - t0
    if code != 0:
        raise DemoError(f"training failed (exit code {code}): {' '.join(cmd)}", code)
    summary = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    summary["planned_steps"] = steps
    summary["elapsed_s"] = elapsed_s
    return summary


def training_lines(summary: dict[str, Any]) -> list[str]:
    """What the training run shows: steps done and its last validation against TKD's."""
    last = summary.get("last", {})
    done, planned = int(summary["global_step"]), int(summary["planned_steps"])
    lines = [f"training: {done}/{planned} steps in {summary['elapsed_s']:.0f} s"]
    if done < planned:
        lines.append(f"  the {TRAIN_MAX_TIME} safety cap stopped training at step {done} "
                     f"(this machine is much slower than expected)")
    if "val/nrmse" in last:
        lines.append(f"  validation ({VAL_SIZE} simulated patches): NRMSE {last['val/nrmse']:.1f} % "
                     f"(TKD first estimate, where the network starts: "
                     f"{last.get('val/nrmse_tkd', float('nan')):.1f} %), "
                     f"HFEN {last.get('val/hfen', float('nan')):.1f} %, "
                     f"XSIM {last.get('val/xsim', float('nan')):.3f}")
    return lines


# ---------------------------------------------------------------------------------------------
# 2-4. simulation and reconstructions
# ---------------------------------------------------------------------------------------------

def truth_paths(bids: Path) -> dict[str, Path]:
    """The simulated truths ``qsmnet simulate`` writes (:mod:`qsmnet.simulation.bids`)."""
    from qsmnet.simulation.bids import DERIVATIVE_NAME

    anat = bids / "derivatives" / DERIVATIVE_NAME / f"sub-{SUBJECT}" / "anat"
    return {k: anat / f"sub-{SUBJECT}_{k}" for k in ("Chimap.nii.gz", "mask.nii.gz",
                                                        "localfield.nii.gz", "simulation.json")}


def write_dipole_inputs(truth: dict[str, Path], in_dir: Path) -> Path:
    """A QSM-CI ``dipole`` input folder from the truths: local field, mask, params.json."""
    import json

    from qsmnet.io.atomic import atomic_write, atomic_write_json

    sim = json.loads(truth["simulation.json"].read_text(encoding="utf-8"))
    for name, key in (("localfield.nii.gz", "localfield.nii.gz"), ("mask.nii.gz", "mask.nii.gz")):
        atomic_write(in_dir / name, lambda tmp, src=truth[key]: shutil.copyfile(src, tmp))
    atomic_write_json(in_dir / "params.json", {"TE": sim["TE"], "B0": sim["B0"],
                                               "B0_dir": sim["B0_dir"],
                                               "voxel_size": sim["voxel_size"]})
    return in_dir


def reconstruct(out: Path, end_to_end: Sequence[tuple[str, str]],
                dipole: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Simulate the subject, then reconstruct it from phase with each of the ``end_to_end``
    methods and from the true local field with each of the ``dipole`` methods
    (``(row name, --method)`` pairs).

    Returns one row per reconstruction: ``input``, ``method``, ``chimap`` (path), ``preview``
    (PNG path or None) and ``seconds``.
    """
    bids = out / "bids"
    _cli(["simulate", "--out", bids, "--subject", SUBJECT, "--seed", str(SEED)])
    dipole_in = write_dipole_inputs(truth_paths(bids), out / "dipole" / "input")
    rows = []
    for name, method in end_to_end:
        folder = out / "recon" / _slug(name)
        t0 = time.perf_counter()
        _cli(["predict", "--bids", bids, "--subject", SUBJECT, "--method", method,
              "--out", folder, "--overwrite"])
        anat = folder / f"sub-{SUBJECT}" / "anat"
        rows.append({"input": "phase (end to end)", "method": name,
                     "chimap": anat / f"sub-{SUBJECT}_Chimap.nii.gz",
                     "preview": anat / f"sub-{SUBJECT}_Chimap.png",
                     "seconds": time.perf_counter() - t0})
    for name, method in dipole:
        folder = out / "dipole" / _slug(name)
        t0 = time.perf_counter()
        _cli(["run-stage", "dipole", dipole_in, folder, "--method", method, "--overwrite"])
        rows.append({"input": "true local field", "method": name,
                     "chimap": folder / "chimap.nii.gz", "preview": None,
                     "seconds": time.perf_counter() - t0})
    return rows


def _slug(name: str) -> str:
    return name.split(" (")[0].replace(" ", "-")


# ---------------------------------------------------------------------------------------------
# 5. scores
# ---------------------------------------------------------------------------------------------

def score_rows(rows: list[dict[str, Any]], truth_chi: Path, truth_mask: Path) -> None:
    """Add ``nrmse`` (%), ``hfen`` (%), ``xsim``, ``nrmse_detrend`` (%) and ``correlation`` to
    each row: its chimap against ``truth_chi`` (ppm) inside ``truth_mask`` (nonzero voxels)."""
    from qsmnet.metrics.evaluate import evaluate_files

    for row in rows:
        # what `qsmnet evaluate` computes (grids checked), without the eroded mask
        result = evaluate_files(row["chimap"], truth_chi, truth_mask, erode_mm=0)
        metrics = result["metrics"]["mask"]
        row.update({k: metrics[k] for k in ("nrmse", "hfen", "xsim", "nrmse_detrend",
                                            "correlation")})


def score_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows' NRMSE, HFEN and XSIM."""
    width = max(len(r["method"]) for r in rows)
    lines = [f"| input              | {'method':<{width}} | NRMSE % | HFEN % | XSIM  |",
             f"|--------------------|-{'-' * width}-|---------|--------|-------|"]
    for r in rows:
        lines.append(f"| {r['input']:<18} | {r['method']:<{width}} | {r['nrmse']:7.1f} | "
                     f"{r['hfen']:6.1f} | {r['xsim']:.3f} |")
    return "\n".join(lines)


def write_scores(path: Path, rows: list[dict[str, Any]], truth: dict[str, Path],
                 training: dict[str, Any] | None) -> Path:
    from qsmnet.io.atomic import atomic_write_json

    record = {"truth_chimap": os.fspath(truth["Chimap.nii.gz"]),
              "mask": os.fspath(truth["mask.nii.gz"]),
              "metrics": "qsm_ci.qsm_eval via qsmnet.metrics.score, inside the simulated mask; "
                         "NRMSE, dNRMSE, HFEN in %",
              "rows": [{k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in r.items()}
                       for r in rows],
              "training": training}
    return atomic_write_json(path, record)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo"), metavar="DIR",
                   help="output folder (default: demo)")
    p.add_argument("--train-steps", type=int, default=60, metavar="N",
                   help="optimiser steps of the demo training (default 60; 0 = no training)")
    p.add_argument("--patch-size", type=int, default=48, metavar="P",
                   help="training patch size, voxels per side, a multiple of 8 (default 48)")
    return p


def run_demo(out: Path, train_steps: int, patch_size: int) -> list[str]:
    """Run every step; return the closing lines (scores table, previews, TensorBoard)."""
    t0 = time.perf_counter()
    dipole = list(BUILTIN)
    training = None
    lines: list[str] = []
    if train_steps > 0:
        _say(f"== 1/3 training the default model for {train_steps} steps ({patch_size}^3 patches)")
        training = run_training(out / "train", train_steps, patch_size)
        lines += training_lines(training)
        # the dipole inversion only: what it was trained for, and a few seconds where end to
        # end would repeat field mapping and background removal for a model this short-trained
        dipole.append((f"demo model ({training['global_step']} steps)",
                       os.fspath(out / "train" / "checkpoints" / "last.ckpt")))
    _say(f"== 2/3 simulating sub-{SUBJECT} (seed {SEED}) and reconstructing it")
    rows = reconstruct(out, BUILTIN, dipole)
    _say("== 3/3 scoring against the simulated truth")
    truth = truth_paths(out / "bids")
    score_rows(rows, truth["Chimap.nii.gz"], truth["mask.nii.gz"])
    scores = write_scores(out / "scores.json", rows, truth, training)
    lines += ["", f"chi against the simulated truth {truth['Chimap.nii.gz']}",
              "inside its brain mask (QSM-CI scorer; NRMSE, HFEN: lower is better, XSIM: "
              "higher is better):", score_table(rows), f"scores: {scores}",
              f"demo finished in {time.perf_counter() - t0:.0f} s", ""]
    lines += [f"preview (PNG): {r['preview']}" for r in rows if r["preview"] is not None]
    if training is not None:
        lines.append(f"training curves: tensorboard --logdir {out / 'train'}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_steps < 0:
        print("demo.py: error: --train-steps must be >= 0", file=sys.stderr)
        return 2
    if args.patch_size < 8 or args.patch_size % 8:
        # the default U-Net has 4 levels: patch sides must divide by 2**3
        print(f"demo.py: error: --patch-size {args.patch_size} must be a multiple of 8",
              file=sys.stderr)
        return 2
    try:
        lines = run_demo(args.out, args.train_steps, args.patch_size)
    except DemoError as exc:
        print(f"demo.py: error: {exc}", file=sys.stderr)
        return exc.code
    _say("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
