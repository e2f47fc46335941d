"""The reconstruction chain on one subject: phase -> total field -> local field -> chi.

:func:`reconstruct` starts wherever the input is (wrapped multi-echo phase, a total field or a
local field) and runs the remaining stages on the chosen device as a chain of named steps, each
a ``sample dict -> sample dict`` callable: qsmnet's transforms through their dict twins
(:meth:`qsmnet.transforms.base.Transform.apply`: ``BrainMask``, ``FieldSupport``,
``FieldMapping``, the background-removal transform of the options), the unreliable-phase test
and fill, and the dipole inversion. It returns every intermediate map with the mask each lives
on and the time each stage took.

Working keys beyond those of :mod:`qsmnet.transforms.base`: ``field_support_mask`` (the region
field mapping and background removal run on), ``unreliable_mask``, ``bfr_weights``,
``inversion_field_ppm`` and ``inversion_mask`` (what background removal returned).
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qsmnet.inference.dipole import TFI_METHOD, TFIChi
from qsmnet.inference.options import ReconOptions
from qsmnet.inference.reference import apply_reference, csf_mask
from qsmnet.io.errors import QSMInputError
from qsmnet.models.inputs import magnitude_prior_from_echoes
from qsmnet.physics.geometry import Geometry
from qsmnet.transforms.background import make_bfr_transform
from qsmnet.transforms.base import DictTransform, Sample
from qsmnet.transforms.field_mapping import FieldMapping
from qsmnet.transforms.field_support import FieldSupport
from qsmnet.transforms.inversion import reference_to_mask_mean
from qsmnet.transforms.masking import BrainMask
from qsmnet.transforms import check_te_s
from qsmnet.transforms.reliability import fill_unreliable, unreliable_phase_mask

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
    ``chi_ppm`` is referenced as ``options.reference`` says (the mean in ``chi_mask`` by
    default; :mod:`qsmnet.inference.reference`), ``reference_mask`` the CSF region of the
    ``csf`` reference (None otherwise) and ``params["reference"]`` what was subtracted.
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
    reference_mask: torch.Tensor | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def invert_on_support(inverter: Callable, field_ppm: torch.Tensor, inversion_mask: torch.Tensor,
                      brain_mask: torch.Tensor, voxel_size_mm, b0_dir, reference: str = "mask-mean",
                      reference_mask: torch.Tensor | None = None, info: dict | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``field_ppm`` on ``inversion_mask`` and report chi on its part inside the brain.

    Returns ``(chi_ppm, chi_mask)``: chi referenced as ``reference`` says (by default to its
    mean in ``chi_mask = inversion_mask & brain_mask``; ``reference_mask`` is the CSF region
    of ``csf``; :func:`qsmnet.inference.reference.apply_reference`, whose account of the
    constant subtracted goes into ``info``) and 0 elsewhere. Inverting on the whole region
    background removal returned (brain and rim) rather than on the brain alone is more
    accurate on the head phantoms ("The field-support rim" in the notes of ``docs/benchmarks.md``).
    """
    chi = inverter(field_ppm, inversion_mask, voxel_size_mm, b0_dir)
    chi_mask = inversion_mask & brain_mask
    chi, applied = apply_reference(chi, chi_mask, reference, reference_mask)
    if info is not None:
        info.update(applied)
    return chi, chi_mask


@contextmanager
def _stage_timer(timings: dict[str, float], key: str, device: torch.device | None = None):
    """Time the enclosed stage into ``timings[key]`` (s, added up over its steps), after
    syncing ``device`` if given."""
    t0 = time.perf_counter()
    yield
    if device is not None:
        _sync(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


Step = Callable[[Sample], Sample]


def _working_sample(sample: Mapping[str, Any], geometry: Geometry, start: str,
                    device: torch.device) -> Sample:
    """The input's tensors on ``device`` (float32, the mask bool), geometry as tuples."""
    def to_dev(x):
        return torch.as_tensor(x).to(device=device, dtype=torch.float32)

    keys = {"phase": ("phase", "magnitude"), "totalfield": ("total_field_ppm",),
            "localfield": ("local_field_ppm",)}[start]
    s: Sample = {k: to_dev(sample[k]) for k in keys if sample.get(k) is not None}
    s.update(voxel_size_mm=geometry.voxel_size_mm, b0_dir=geometry.b0_dir)
    for k in ("te_s", "b0_t"):
        if k in sample:
            s[k] = sample[k]
    mask = sample.get("mask")
    s["mask"] = None if mask is None else torch.as_tensor(mask).to(device=device,
                                                                   dtype=torch.bool)
    return s


def _check_mask(s: Sample) -> Sample:
    if not bool(s["mask"].any()):
        raise QSMInputError("the mask is empty")
    return s


def _field_mapping_steps(s: Sample, options: ReconOptions, fm: FieldMapping,
                         params: dict[str, Any]) -> list[tuple[str, Step]]:
    """Mask (automatic if none), field support and field mapping, from phase."""
    steps: list[tuple[str, Step]] = []
    has_mag = s.get("magnitude") is not None
    if s["mask"] is None:
        if not has_mag:
            raise QSMInputError("no mask and no magnitude: give a mask or the magnitude "
                                "images so an automatic mask can be made")
        steps.append(("mask", DictTransform(BrainMask(), {"magnitude": "magnitude",
                                                          "voxel_size_mm": "voxel_size_mm"})))
        params["mask"] = "automatic (BrainMask, Otsu)"
    else:
        params["mask"] = "given"
    steps.append(("mask", _check_mask))
    margin = float(options.field_margin_mm or 0.0) if has_mag else 0.0
    if margin:
        steps.append(("field_support", DictTransform(FieldSupport(margin))))
    else:
        steps.append(("field_support", lambda x: {**x, "field_support_mask": x["mask"]}))
    params["field_margin_mm"] = margin
    s.setdefault("magnitude", None)
    steps.append(("field_mapping", DictTransform(
        fm, {"phase_rad": "phase", "magnitude": "magnitude", "te_s": "te_s", "b0_t": "b0_t",
             "mask": "field_support_mask", "voxel_size_mm": "voxel_size_mm"},
        ["total_field_ppm", "field_support_mask", "field_noise_ppm"])))
    return steps


def _unreliable_step(max_step_rad: float, ref_index: int, weigh: bool,
                     params: dict[str, Any]) -> Step:
    """Flag voxels whose field jumps too far between neighbours; with ``weigh``, background
    removal gets them as zero weight (``bfr_weights``)."""
    def step(s: Sample) -> Sample:
        te_ref = float(check_te_s(s["te_s"])[ref_index])
        unreliable = unreliable_phase_mask(s["total_field_ppm"], s["field_support_mask"], te_ref,
                                           float(s["b0_t"]), max_step_rad)
        params["unreliable_voxels"] = int(unreliable.sum())
        out = {**s, "unreliable_mask": unreliable}
        if weigh:
            out["bfr_weights"] = (s["field_support_mask"] & ~unreliable).to(
                s["total_field_ppm"].dtype)
        return out

    return step


def _fill_unreliable(s: Sample) -> Sample:
    inv_mask = s["inversion_mask"]
    filled = fill_unreliable(s["inversion_field_ppm"], inv_mask, s["unreliable_mask"] & inv_mask,
                             s["voxel_size_mm"])
    return {**s, "inversion_field_ppm": reference_to_mask_mean(filled, inv_mask)}


def _check_bfr_kept_brain(bfr: str) -> Step:
    def step(s: Sample) -> Sample:
        if not bool((s["inversion_mask"] & s["mask"]).any()):
            raise QSMInputError(f"{bfr} eroded the whole mask: the brain mask is too small for "
                                "this background-removal radius")
        return s

    return step


def _background_steps(s: Sample, options: ReconOptions, start: str, ref_index: int | None,
                      params: dict[str, Any]) -> list[tuple[str, Step]]:
    """Background removal, with the unreliable-phase test and fill from phase."""
    steps: list[tuple[str, Step]] = []
    if start == "totalfield":
        steps.append(("mask", _check_mask))
        steps.append(("background_removal",
                      lambda x: {**x, "field_support_mask": x["mask"]}))
    bfr_params = dict(options.bfr_params)
    check_unreliable = start == "phase" and bool(options.max_phase_step_rad)
    weighted = options.bfr in ("pdf", "tfi")
    if check_unreliable:
        weigh = weighted and "weights" not in bfr_params
        steps.append(("background_removal", _unreliable_step(
            float(options.max_phase_step_rad), ref_index, weigh, params)))
    keys = {"field_ppm": "total_field_ppm", "mask": "field_support_mask",
            "voxel_size_mm": "voxel_size_mm"}
    if weighted:
        keys["b0_dir"] = "b0_dir"
        if "weights" in bfr_params:
            s["bfr_weights"] = bfr_params["weights"]
        if "weights" in bfr_params or check_unreliable:
            keys["weights"] = "bfr_weights"
    if options.bfr == "tfi" and start == "phase":
        # TFI weighs the data by the inverse of the field's noise (field mapping's estimate)
        keys["field_noise_ppm"] = "field_noise_ppm"
    outputs = ["inversion_field_ppm", "inversion_mask"]
    if options.method == TFI_METHOD:
        # TFI's own chi is the result: keep it from the same solve
        bfr_params["return_chi"] = True
        outputs.append(TFIChi.chi_key)
    steps.append(("background_removal", DictTransform(
        make_bfr_transform(options.bfr, bfr_params), keys, outputs)))
    if check_unreliable:
        steps.append(("background_removal", _fill_unreliable))
    steps.append(("background_removal", _check_bfr_kept_brain(options.bfr)))
    return steps


def _inversion_step(inverter: Callable, reference: str, params: dict[str, Any]) -> Step:
    def step(s: Sample) -> Sample:
        info: dict[str, Any] = {}
        key = getattr(inverter, "chi_key", None)
        # chi computed upstream (--method tfi: the total-field inversion's own)
        invert = (lambda *_: s[key]) if key is not None and key in s else inverter
        if getattr(inverter, "needs_magnitude", False):  # present: reconstruction_steps checked
            prior = magnitude_prior_from_echoes(s["magnitude"])
            invert = functools.partial(inverter, magnitude=prior)
        chi, chi_mask = invert_on_support(invert, s["inversion_field_ppm"], s["inversion_mask"],
                                          s["mask"], s["voxel_size_mm"], s["b0_dir"], reference,
                                          s.get("reference_mask"), info)
        params["reference"] = info
        return {**s, "chi_ppm": chi, "chi_mask": chi_mask}

    return step


def _csf_region_step(s: Sample) -> Sample:
    """The ventricular CSF of the ``csf`` reference, from the multi-echo magnitude."""
    if s.get("magnitude") is None or "te_s" not in s:
        raise QSMInputError("--reference csf: needs the multi-echo magnitude images (the CSF "
                            "region is found from R2*); give them or use --reference mask-mean")
    region = csf_mask(s["magnitude"].detach().cpu().numpy(), check_te_s(s["te_s"]),
                      s["mask"].detach().cpu().numpy(), s["voxel_size_mm"])
    return {**s, "reference_mask": torch.from_numpy(region).to(s["mask"].device)}


def _local_field_steps() -> list[tuple[str, Step]]:
    def step(s: Sample) -> Sample:
        mask = s["mask"]
        return {**s, "inversion_field_ppm": s["local_field_ppm"] * mask, "inversion_mask": mask}

    return [("mask", _check_mask), ("dipole_inversion", step)]


def reconstruction_steps(sample: Sample, options: ReconOptions, start: str, inverter: Callable,
                         field_mapping: FieldMapping | None, params: dict[str, Any]
                         ) -> list[tuple[str, Step]]:
    """The chain of named steps :func:`reconstruct` runs from ``start`` (in order; the name is
    the stage a step's time is counted under)."""
    if getattr(inverter, "needs_magnitude", False):  # refused before minutes of field mapping
        inverter.require_magnitude(sample.get("magnitude") if start == "phase" else None)
    steps: list[tuple[str, Step]] = []
    ref_index = None
    if start == "phase":
        fm = field_mapping if field_mapping is not None else FieldMapping()
        ref_index = fm.ref_index
        steps += _field_mapping_steps(sample, options, fm, params)
    elif sample["mask"] is None:
        raise QSMInputError(f"a mask is needed when starting from the {start}")
    if start in ("phase", "totalfield"):
        steps += _background_steps(sample, options, start, ref_index, params)
    else:
        steps += _local_field_steps()
    if options.reference == "csf":
        steps.append(("reference", _csf_region_step))
    steps.append(("dipole_inversion", _inversion_step(inverter, options.reference, params)))
    return steps


def _run_steps(s: Sample, steps: Sequence[tuple[str, Step]], device: torch.device,
               timings: dict[str, float]) -> Sample:
    for name, step in steps:
        with _stage_timer(timings, name, device):
            s = step(s)
    return s


def reconstruct(sample: Mapping[str, Any], options: ReconOptions | None = None,
                start: str = "phase", inverter: Callable | None = None,
                field_mapping: FieldMapping | None = None) -> Reconstruction:
    """Reconstruct chi (ppm) from a sample dict (keys of :mod:`qsmnet.transforms.base`).

    Parameters
    ----------
    sample : mapping
        ``start="phase"``: ``phase`` (E, X, Y, Z) rad, ``magnitude`` (optional), ``te_s``,
        ``b0_t``; ``"totalfield"``: ``total_field_ppm``; ``"localfield"``: ``local_field_ppm``.
        Always ``voxel_size_mm``, ``b0_dir`` (read once into a
        :class:`~qsmnet.physics.geometry.Geometry`); ``mask`` optional for phase input
        (automatic mask from the magnitude), required otherwise.
    options : ReconOptions
        Method, background removal, device and their settings (defaults when None). From
        phase, voxels whose field jumps by more than ``options.max_phase_step_rad`` are treated
        as unreliable: PDF gives them zero weight, and their local field is filled in from
        reliable neighbours before the inversion (not the *total* field before an SMV filter:
        that fill is less accurate on steep fields than the few wrong voxels it replaces;
        "Unreliable phase" in the notes of ``docs/benchmarks.md``). From phase with magnitude,
        field mapping, background removal and the inversion also use the rim of
        ``options.field_margin_mm`` around the brain mask, and chi is reported on the brain
        mask (a local or total field given as input is used on the mask alone: its values
        outside the mask are not known to be measured).
    start : ``"phase"``, ``"totalfield"`` or ``"localfield"``
        Where the input enters the chain.
    inverter : a ready inverter (overrides ``options.method``; lets callers load a network
        once).
    field_mapping : a configured :class:`~qsmnet.transforms.field_mapping.FieldMapping`
        (default settings when None).
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    options = options if options is not None else ReconOptions()
    device = options.torch_device
    geometry = Geometry.of_sample(sample)
    timings: dict[str, float] = {}
    params: dict[str, Any] = {"start": start, "bfr": options.bfr, "device": str(device)}
    # the method's settings (numbers), not per-call arrays such as weights
    settings = {k: v for k, v in options.bfr_params.items()
                if isinstance(v, (bool, int, float, str, tuple, list))}
    if settings:
        params["bfr_params"] = settings
    if inverter is None:
        inverter = options.make_inverter(after_bfr=start != "localfield")
    s = _working_sample(sample, geometry, start, device)
    steps = reconstruction_steps(s, options, start, inverter, field_mapping, params)
    s = _run_steps(s, steps, device, timings)
    if start == "phase":
        params["support_rim_voxels"] = int((s["field_support_mask"] & ~s["mask"]).sum())
    params["method"] = getattr(inverter, "name", None) or options.method
    params["method_params"] = {k: v for k, v in getattr(inverter, "params", {}).items()
                               if k != "model_config"}
    return _reconstruction(s, timings, params)


def _reconstruction(s: Sample, timings: dict[str, float], params: dict[str, Any]
                    ) -> Reconstruction:
    def cpu(key):
        x = s.get(key)
        return None if x is None else x.detach().to("cpu")

    local_brain = reference_to_mask_mean(s["inversion_field_ppm"], s["chi_mask"])
    return Reconstruction(chi_ppm=cpu("chi_ppm"), local_field_ppm=local_brain.detach().cpu(),
                          chi_mask=cpu("chi_mask"), mask=cpu("mask"),
                          total_field_ppm=cpu("total_field_ppm"),
                          field_noise_ppm=cpu("field_noise_ppm"),
                          unreliable_mask=cpu("unreliable_mask"),
                          support_mask=cpu("field_support_mask") if "field_support_mask" in s
                          else cpu("mask"),
                          inversion_mask=cpu("inversion_mask"),
                          inversion_field_ppm=cpu("inversion_field_ppm"),
                          reference_mask=cpu("reference_mask"), timings_s=timings,
                          params=params)
