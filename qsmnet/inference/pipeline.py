"""The reconstruction chain on one subject: phase -> total field -> local field -> chi.

:func:`reconstruct` starts wherever the input is (wrapped multi-echo phase, a total field or a
local field), runs the remaining stages with qsmnet's transforms on the chosen device, and returns
every intermediate map with the mask each lives on and the time each stage took.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qsmnet.inference.dipole import make_inverter
from qsmnet.io.errors import QSMInputError
from qsmnet.transforms.background import BFR_METHODS, remove_background
from qsmnet.transforms.field_mapping import FieldMapping
from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM, field_support_mask
from qsmnet.transforms.inversion import reference_to_mask_mean
from qsmnet.transforms.masking import BrainMask
from qsmnet.transforms import check_te_s
from qsmnet.transforms.reliability import (
    DEFAULT_MAX_PHASE_STEP_RAD,
    fill_unreliable,
    unreliable_phase_mask,
)

STARTS = ("phase", "totalfield", "localfield")


@dataclass
class Reconstruction:
    """Outputs of :func:`reconstruct`, all ``(X, Y, Z)`` CPU tensors on the input grid.

    ``mask`` is the input (or automatic) brain mask. ``support_mask`` is the region field
    mapping and background removal ran on: the brain mask and, from phase with magnitude, the
    reliable rim around it (:func:`qsmnet.transforms.field_support.field_support_mask`).
    ``inversion_mask`` is the part of it that background removal returned a field on
    (``inversion_field_ppm``), where the dipole inversion ran. ``chi_mask`` is its part inside
    the brain mask, where ``chi_ppm`` and ``local_field_ppm`` are reported (each referenced to
    its mean there, 0 elsewhere). ``unreliable_mask`` (phase input) marks the voxels whose field
    failed the phase-step test of :func:`qsmnet.transforms.reliability.unreliable_phase_mask`.
    """

    chi_ppm: torch.Tensor
    local_field_ppm: torch.Tensor
    chi_mask: torch.Tensor
    mask: torch.Tensor
    total_field_ppm: torch.Tensor | None = None
    field_noise_ppm: torch.Tensor | None = None
    unreliable_mask: torch.Tensor | None = None
    support_mask: torch.Tensor | None = None
    inversion_mask: torch.Tensor | None = None
    inversion_field_ppm: torch.Tensor | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def invert_on_support(inverter: Callable, field_ppm: torch.Tensor, inversion_mask: torch.Tensor,
                      brain_mask: torch.Tensor, voxel_size_mm, b0_dir
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``field_ppm`` on ``inversion_mask`` and report chi on its part inside the brain.

    Returns ``(chi_ppm, chi_mask)``: chi referenced to its mean in ``chi_mask = inversion_mask
    & brain_mask`` and 0 elsewhere. Inverting on the whole region background removal returned
    (brain and rim) rather than on the brain alone is more accurate on the head phantoms
    ("The field-support rim" in the notes of ``docs/benchmarks.md``).
    """
    chi = inverter(field_ppm, inversion_mask, voxel_size_mm, b0_dir)
    chi_mask = inversion_mask & brain_mask
    return reference_to_mask_mean(chi, chi_mask), chi_mask


@contextmanager
def _stage_timer(timings: dict[str, float], key: str, device: torch.device | None = None):
    """Time the enclosed stage into ``timings[key]`` (s), after syncing ``device`` if given."""
    t0 = time.perf_counter()
    yield
    if device is not None:
        _sync(device)
    timings[key] = time.perf_counter() - t0


def _to_device_fn(device: torch.device) -> Callable[[Any], torch.Tensor]:
    def to_dev(x):
        return torch.as_tensor(x).to(device=device, dtype=torch.float32)

    return to_dev


def _check_options(start: str, bfr: str, field_margin_mm: float | None) -> None:
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if bfr not in BFR_METHODS:
        raise QSMInputError(f"unknown background-removal method {bfr!r}: use "
                            f"{', '.join(BFR_METHODS)}")
    if field_margin_mm is not None and not field_margin_mm >= 0:
        raise QSMInputError(f"the field margin must be >= 0 mm, got {field_margin_mm}")


def _map_phase_to_field(sample: Mapping[str, Any], mask: torch.Tensor | None, fm: FieldMapping,
                        vs: torch.Tensor, field_margin_mm: float | None, device: torch.device,
                        timings: dict[str, float], params: dict[str, Any]):
    """Mask (automatic if none), field support and field mapping from phase.

    Returns ``(mask, support, total, noise)``; fills the ``mask``, ``field_support`` and
    ``field_mapping`` timings and the matching ``params``.
    """
    to_dev = _to_device_fn(device)
    mag = sample.get("magnitude")
    if mask is None:
        if mag is None:
            raise QSMInputError("no mask and no magnitude: give a mask or the magnitude "
                                "images so an automatic mask can be made")
        with _stage_timer(timings, "mask", device):
            mask = BrainMask()(to_dev(mag), None, vs.tolist())
        params["mask"] = "automatic (BrainMask, Otsu)"
    else:
        params["mask"] = "given"
    support = mask
    if field_margin_mm and mag is not None:
        with _stage_timer(timings, "field_support"):
            support = field_support_mask(mask, mag, vs.tolist(), float(field_margin_mm))
    params["field_margin_mm"] = float(field_margin_mm or 0.0) if mag is not None else 0.0
    params["support_rim_voxels"] = int((support & ~mask).sum())
    with _stage_timer(timings, "field_mapping", device):
        total, support, noise = fm(to_dev(sample["phase"]), None if mag is None else to_dev(mag),
                                   sample["te_s"], float(sample["b0_t"]), support, vs.tolist())
    return mask, support, total, noise


def _remove_background_stage(sample: Mapping[str, Any], start: str, bfr: str,
                             bfr_params: Mapping[str, Any] | None, total: torch.Tensor,
                             support: torch.Tensor, mask: torch.Tensor, vs: torch.Tensor,
                             b0: torch.Tensor, ref_index: int | None,
                             max_phase_step_rad: float | None, device: torch.device,
                             timings: dict[str, float], params: dict[str, Any]):
    """Background removal (with the unreliable-phase handling from phase).

    Returns ``(local, inv_mask, unreliable)``; fills the ``background_removal`` timing.
    """
    unreliable = None
    with _stage_timer(timings, "background_removal", device):
        kwargs = dict(bfr_params or {})
        if start == "phase" and max_phase_step_rad:
            te_ref = float(check_te_s(sample["te_s"])[ref_index])
            unreliable = unreliable_phase_mask(total, support, te_ref, float(sample["b0_t"]),
                                               max_phase_step_rad)
            params["unreliable_voxels"] = int(unreliable.sum())
            if bfr == "pdf" and "weights" not in kwargs:
                kwargs["weights"] = (support & ~unreliable).to(total.dtype)
        local, inv_mask = remove_background(bfr, total, support, tuple(vs.tolist()),
                                            tuple(b0.tolist()), **kwargs)
        if unreliable is not None:
            local = reference_to_mask_mean(
                fill_unreliable(local, inv_mask, unreliable & inv_mask, vs.tolist()), inv_mask)
    if not bool((inv_mask & mask).any()):
        raise QSMInputError(f"{bfr} eroded the whole mask: the brain mask is too small for "
                            "this background-removal radius")
    return local, inv_mask, unreliable


def reconstruct(sample: Mapping[str, Any], method: str = "unet", start: str = "phase",
                bfr: str = "pdf", device: str | torch.device = "cpu",
                bfr_params: Mapping[str, Any] | None = None,
                field_mapping: FieldMapping | None = None,
                inverter: Callable | None = None,
                max_phase_step_rad: float | None = DEFAULT_MAX_PHASE_STEP_RAD,
                field_margin_mm: float | None = DEFAULT_FIELD_MARGIN_MM) -> Reconstruction:
    """Reconstruct chi (ppm) from a sample dict (keys of :mod:`qsmnet.transforms.base`).

    Parameters
    ----------
    sample : mapping
        ``start="phase"``: ``phase`` (E, X, Y, Z) rad, ``magnitude`` (optional), ``te_s``,
        ``b0_t``; ``"totalfield"``: ``field_ppm``; ``"localfield"``: ``local_field_ppm``. Always
        ``voxel_size_mm``, ``b0_dir``; ``mask`` optional for phase input (automatic mask from the
        magnitude), required otherwise.
    method : dipole inversion (see :func:`qsmnet.inference.dipole.make_inverter`).
    bfr : background-field removal: ``pdf`` (default), ``vsharp``, ``resharp`` or ``vresharp``.
    inverter : a ready inverter (overrides ``method``; lets callers load a network once).
    max_phase_step_rad : from phase, voxels whose field jumps by more than this phase (at the
        spatially unwrapped echo) from a neighbour are treated as unreliable (2pi aliasing next
        to air): PDF gives them zero weight, and their local field is filled in from reliable
        neighbours before the inversion (not the *total* field before an SMV filter: that fill is
        less accurate on steep fields than the few wrong voxels it replaces; "Unreliable phase"
        in the notes of ``docs/benchmarks.md``). ``None`` or 0 turns this off.
    field_margin_mm : from phase with magnitude, field mapping, background removal and the
        inversion also use the voxels up to this far outside the brain mask whose magnitude is
        like the brain's (the CSF rim; :func:`qsmnet.transforms.field_support.field_support_mask`),
        and chi is reported on the brain mask. ``None`` or 0 uses the brain mask alone (as a
        local or total field given as input always does: its values outside the mask are not
        known to be measured).
    """
    _check_options(start, bfr, field_margin_mm)
    device = torch.device(device)
    vs = torch.as_tensor(sample["voxel_size_mm"], dtype=torch.float64).reshape(3)
    b0 = torch.as_tensor(sample["b0_dir"], dtype=torch.float64).reshape(3)
    timings: dict[str, float] = {}
    params: dict[str, Any] = {"start": start, "bfr": bfr, "device": str(device)}
    if inverter is None:
        inverter = make_inverter(method, device, after_bfr=start != "localfield")
    to_dev = _to_device_fn(device)

    mask = sample.get("mask")
    mask = None if mask is None else torch.as_tensor(mask).to(device=device, dtype=torch.bool)
    total = noise = fm = None
    if start == "phase":
        fm = field_mapping if field_mapping is not None else FieldMapping()
        mask, support, total, noise = _map_phase_to_field(
            sample, mask, fm, vs, field_margin_mm, device, timings, params)
    elif mask is None:
        raise QSMInputError(f"a mask is needed when starting from the {start}")
    else:
        support = mask
    if not bool(mask.any()):
        raise QSMInputError("the mask is empty")

    unreliable = None
    if start in ("phase", "totalfield"):
        if total is None:
            total = to_dev(sample["field_ppm"])
        ref_index = fm.ref_index if fm is not None else None
        local, inv_mask, unreliable = _remove_background_stage(
            sample, start, bfr, bfr_params, total, support, mask, vs, b0, ref_index,
            max_phase_step_rad, device, timings, params)
    else:
        local = to_dev(sample["local_field_ppm"]) * mask
        inv_mask = mask

    with _stage_timer(timings, "dipole_inversion", device):
        chi, chi_mask = invert_on_support(inverter, local, inv_mask, mask, vs, b0)
    params["method"] = getattr(inverter, "name", None) or str(method)
    params["method_params"] = {k: v for k, v in getattr(inverter, "params", {}).items()
                               if k != "model_config"}
    cpu = (lambda x: None if x is None else x.detach().to("cpu"))  # noqa: E731
    local_brain = reference_to_mask_mean(local, chi_mask)
    return Reconstruction(chi_ppm=cpu(chi), local_field_ppm=cpu(local_brain),
                          chi_mask=cpu(chi_mask), mask=cpu(mask), total_field_ppm=cpu(total),
                          field_noise_ppm=cpu(noise), unreliable_mask=cpu(unreliable),
                          support_mask=cpu(support), inversion_mask=cpu(inv_mask),
                          inversion_field_ppm=cpu(local), timings_s=timings, params=params)
