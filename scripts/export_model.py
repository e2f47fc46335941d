#!/usr/bin/env python
"""Export a training checkpoint as a qsmnet release file with its model card.

    python scripts/export_model.py logs/shipped_cpu/checkpoints/best.ckpt \
        --out qsmnet/weights/qsmnet_default.pt --name qsmnet-default-cpu \
        --refine-iterations 10 --notes "trained on CPU, see docs/benchmarks.md"

Writes ``<out>`` (float16 weights, config, metadata), ``<out>.json`` (config + metadata) and
``MODEL_CARD.md`` beside it: the training config, the steps, the data, the validation metrics
stored in the checkpoint, and the commands that reproduce the run: one per training run in its
lineage (a fine-tune lists the runs it started from, oldest first; see
``qsmnet.training.provenance``), with paths inside the repository written relative to it and
paths outside it left out, so the card holds no machine's directories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from qsmnet.inference.model_store import read_checkpoint, save_release
from qsmnet.io.atomic import atomic_write_text
from qsmnet.io.errors import QSMInputError
from qsmnet.models import QSMNet
from qsmnet.training.provenance import checkpoint_lineage, commands
from qsmnet.training.validation import validate_checkpoint



_ESTIMATE_NAMES = {"tkd": "a TKD estimate", "l2": "a closed-form L2 estimate",
                   "tv": "a TV-ADMM estimate (data term on the brain mask)"}


def _estimates_text(net) -> str:
    names = [_ESTIMATE_NAMES[c] for c in net.get_config()["channels"] if c in _ESTIMATE_NAMES]
    return " and ".join(names) if names else "the local field only"


def _residual_text(net) -> str:
    base = net.get_config().get("residual_from")
    return f"; the U-Net learns the correction to the {base.upper()} estimate" if base else ""


def _data_text(data: dict) -> str:
    text = ("qsmnet's on-the-fly simulator (`configs/data/simulated.yaml`: random shapes, vessels, "
            "textures, strong sources, brain-like masks, B0 tilt up to 60 deg, voxels 0.6-2 mm, "
            "noise from SNR 20-300)")
    fraction = float(data.get("anatomical_fraction") or 0.0)
    if fraction > 0:
        lo, hi = data.get("anatomical", {}).get("voxel_size_range_mm", ["?", "?"])
        text += (f"; in the last run {fraction:.0%} of the samples came from the anatomical "
                 f"phantom generator (`qsmnet.simulation`, a real brain parcellation, voxels "
                 f"{lo}-{hi} mm)")
    return text


def _validation_text(val: dict[str, float]) -> str:
    """``NRMSE 21.69 %, ...`` from :func:`validate_checkpoint`'s ``{"val/nrmse": ...}``."""
    names = {"val/nrmse": "NRMSE", "val/nrmse_detrended": "detrended NRMSE", "val/hfen": "HFEN"}
    return ", ".join(f"XSIM {v:.3f}" if k == "val/xsim" else f"{names.get(k, k)} {v:.2f} %"
                     for k, v in val.items())


def _training_text(lineage: list[dict]) -> str:
    """The card's training and reproduction lines: one command per run, oldest first."""
    steps = [s.get("global_step") for s in lineage]
    total = sum(steps) if None not in steps else None
    cmds = commands(lineage)
    if len(lineage) == 1:
        return (f"{lineage[0]['global_step']} optimiser steps, seed {lineage[0]['seed']}",
                f"`{cmds[0]}`")
    runs = "; ".join(f"{s.get('global_step')} (seed {s.get('seed')})" for s in lineage)
    lines = [f"{len(lineage)} runs, each started from the previous one's weights "
             "(`init_from=`, which names the previous result: `unet` is the release shipped at "
             "the time)"]
    for i, (s, cmd) in enumerate(zip(lineage, cmds), 1):
        label = f" -> `{s['name']}`" if s.get("name") else ""
        lines.append(f"  {i}. `{cmd}` ({s.get('global_step')} steps{label})")
    return (f"{total if total is not None else 'unknown'} optimiser steps in all: {runs}",
            "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--refine-iterations", type=int, default=0,
                   help="test-time data-consistency iterations recommended for this model")
    p.add_argument("--refine-weight", type=float, default=0.05)
    p.add_argument("--refine-iterations-after-bfr", type=int, default=None,
                   help="the same for local fields from background removal (input from phase; "
                        "default: --refine-iterations); choose it with "
                        "scripts/tune_refinement.py --bfr pdf")
    p.add_argument("--notes", default="")
    a = p.parse_args(argv)

    try:
        ckpt = read_checkpoint(a.ckpt)
    except QSMInputError as exc:
        print(f"export_model.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    net = QSMNet.from_checkpoint_dict(ckpt)
    run_dir = a.ckpt.resolve().parents[1]
    cfg_path = run_dir / ".hydra" / "config.yaml"
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
    try:
        lineage = checkpoint_lineage(ckpt, a.ckpt)
    except QSMInputError as exc:  # the init_from source of an old run is gone
        print(f"export_model.py: error: {a.ckpt.name}: its training lineage cannot be read: "
              f"{' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    lineage[-1]["name"] = a.name
    # Measured on these weights: the checkpoint's own "best" score may belong to other weights
    # (a periodic checkpoint is written before the validation of its step).
    try:
        val = validate_checkpoint(ckpt, net)
    except QSMInputError as exc:
        print(f"export_model.py: error: {a.ckpt.name}: {exc}", file=sys.stderr)
        return 2
    meta = {"name": a.name, "global_step": int(ckpt.get("global_step", 0)),
            "epoch": int(ckpt.get("epoch", 0)), "refine_iterations": a.refine_iterations,
            "refine_iterations_after_bfr": (a.refine_iterations if a.refine_iterations_after_bfr
                                            is None else a.refine_iterations_after_bfr),
            "refine_weight": a.refine_weight, "validation": val, "train_overrides": overrides,
            "data": cfg.get("data", {}), "loss": cfg.get("loss", {}), "optim": cfg.get("optim", {}),
            "seed": cfg.get("seed"), "lineage": lineage, "notes": a.notes,
            "parameters": sum(p.numel() for p in net.parameters())}
    save_release(net, a.out, meta, half=True)
    training, reproduce = _training_text(lineage)
    card = f"""# Model card: {a.name}

- **File**: `{a.out.name}` ({a.out.stat().st_size / 1e6:.1f} MB, float16 weights; loaded by
  `qsmnet predict --method unet` and `qsmnet.inference.model_store.load_network("unet")`).
- **Task**: dipole inversion, local field (ppm) -> susceptibility (ppm), any B0 direction and
  voxel size (the network input includes {_estimates_text(net)} computed with the acquisition's
  own dipole kernel{_residual_text(net)}).
- **Architecture**: `QSMNet` {json.dumps(net.get_config())}; {meta['parameters']:,} parameters.
- **Training**: {training}, on {_data_text(meta['data'])}.
- **Reproduce**: {reproduce}
- **Validation** (these weights on the training run's fixed simulated validation set, rebuilt from the checkpoint): {_validation_text(val)}
- **Recommended test-time data consistency**: {a.refine_iterations} CG iterations, weight
  {a.refine_weight} (`qsmnet.inference.dipole.dc_refine`) on a given local field (dipole
  stage); {meta['refine_iterations_after_bfr']} on a local field from background removal (input
  from phase or total field: `predict`, `run-stage end-to-end`).
- **Accuracy** on the head-like and anatomical phantoms (qsm-forward): see `docs/benchmarks.md`.
- **Notes**: {a.notes}
"""
    atomic_write_text(a.out.parent / "MODEL_CARD.md", card)
    print(f"wrote {a.out} and {a.out.parent / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
