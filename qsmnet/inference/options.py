"""What a user chooses for a reconstruction, built once where the request enters.

:class:`ReconOptions` holds the choices of ``qsmnet predict`` and ``qsmnet run-stage`` (the
inversion, the background removal and their settings, the device). The CLI builds it from its
arguments (:meth:`ReconOptions.from_args`), a Python caller directly; everything below
(:func:`qsmnet.inference.pipeline.reconstruct`, :func:`qsmnet.inference.stages.run_stage`,
the per-subject loop of ``predict``) takes it whole instead of loose arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qsmnet.inference.dipole import TFI_METHOD, make_inverter
from qsmnet.inference.reference import DEFAULT_REFERENCE, check_reference
from qsmnet.io.errors import QSMInputError
from qsmnet.transforms.background import BFR_METHODS
from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM
from qsmnet.transforms.reliability import DEFAULT_MAX_PHASE_STEP_RAD

__all__ = ["ReconOptions", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an input error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QSMInputError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def tfi_iteration_params(iterations: Sequence[int] | None) -> dict[str, Any]:
    """``--tfi-iterations OUTER CG`` as TFI's keyword arguments ({} for its defaults when
    None), checked."""
    if iterations is None:
        return {}
    outer, cg = (int(n) for n in iterations)
    if outer < 1 or cg < 1:
        raise QSMInputError(f"--tfi-iterations: both counts must be >= 1, got {outer} {cg}")
    return {"outer_iterations": outer, "cg_iterations": cg}


def _bfr_params_from_args(args) -> dict[str, Any]:
    """``--tfi-iterations`` as background removal's keyword arguments (checked here, so that a
    bad value stops the run before any subject is read)."""
    iterations = getattr(args, "tfi_iterations", None)
    if iterations is not None and args.bfr != "tfi":
        raise QSMInputError(f"--tfi-iterations: only used with --bfr tfi (not --bfr {args.bfr})")
    return tfi_iteration_params(iterations)


@dataclass(frozen=True)
class ReconOptions:
    """The choices of one reconstruction run (the same for every subject of the run).

    Attributes
    ----------
    method : str
        Dipole inversion: ``unet``, ``tkd``, ``l2``, ``tv`` or a model file (``.pt``/``.ckpt``);
        see :func:`qsmnet.inference.dipole.make_inverter`.
    bfr : str
        Background-field removal, a key of
        :data:`qsmnet.transforms.background.BFR_METHODS`.
    bfr_params : mapping
        Keyword arguments of that method's transform (its defaults when empty).
    device : str
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (resolved by :attr:`torch_device`).
    dc_iterations : int or None
        Test-time data-consistency iterations after the inversion; None: what the model
        recommends for the input (0 for the classical methods).
    max_phase_step_rad : float or None
        From phase, the phase step (rad, at the spatially unwrapped echo) beyond which a voxel
        is unreliable (:func:`qsmnet.transforms.reliability.unreliable_phase_mask`); None or 0:
        off.
    field_margin_mm : float or None
        From phase with magnitude, the rim (mm) of bright signal around the brain mask that
        field mapping, background removal and the inversion also use
        (:func:`qsmnet.transforms.field_support.field_support_mask`); None or 0: the mask alone.
    reference : str
        How chi is referenced, one of :data:`qsmnet.inference.reference.REFERENCES`
        (``mask-mean``, ``csf``, ``none``; :func:`qsmnet.inference.reference.apply_reference`).
    roi_labels : str or None
        ``predict``: a label image on the chi map's grid; a TSV of chi statistics per label is
        written with the outputs (:mod:`qsmnet.metrics.roi`).
    roi_names : str or None
        A table of label names for ``roi_labels`` (index and name per line).
    """

    method: str = "unet"
    bfr: str = "tfi"
    bfr_params: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dc_iterations: int | None = None
    max_phase_step_rad: float | None = DEFAULT_MAX_PHASE_STEP_RAD
    field_margin_mm: float | None = DEFAULT_FIELD_MARGIN_MM
    reference: str = DEFAULT_REFERENCE
    roi_labels: str | None = None
    roi_names: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", os.fspath(self.method))
        object.__setattr__(self, "device", str(self.device))
        object.__setattr__(self, "bfr_params", dict(self.bfr_params))
        check_reference(self.reference)
        for name in ("roi_labels", "roi_names"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else os.fspath(value))
        if self.roi_names is not None and self.roi_labels is None:
            raise QSMInputError("--roi-names: only used with --roi LABELS")
        if self.bfr not in BFR_METHODS:
            raise QSMInputError(f"unknown background-removal method {self.bfr!r}: use "
                                f"{', '.join(BFR_METHODS)}")
        if self.method == TFI_METHOD and self.bfr != "tfi":
            raise QSMInputError(f"--method tfi: needs --bfr tfi (its chi comes out of the "
                                f"total-field inversion), not --bfr {self.bfr}")
        if self.field_margin_mm is not None and not self.field_margin_mm >= 0:
            raise QSMInputError(f"the field margin must be >= 0 mm, got {self.field_margin_mm}")
        if self.max_phase_step_rad is not None and not self.max_phase_step_rad >= 0:
            raise QSMInputError("the largest phase step must be >= 0 rad, got "
                                f"{self.max_phase_step_rad}")
        if self.dc_iterations is not None and self.dc_iterations < 0:
            raise QSMInputError("the number of data-consistency iterations must be >= 0, got "
                                f"{self.dc_iterations}")

    @classmethod
    def from_args(cls, args) -> ReconOptions:
        """The options of a parsed ``predict`` / ``run-stage`` command line."""
        return cls(method=os.fspath(args.method), bfr=args.bfr, device=args.device,
                   bfr_params=_bfr_params_from_args(args),
                   dc_iterations=args.dc_iterations, max_phase_step_rad=args.max_phase_step,
                   field_margin_mm=args.field_margin,
                   reference=getattr(args, "reference", DEFAULT_REFERENCE),
                   roi_labels=getattr(args, "roi", None),
                   roi_names=getattr(args, "roi_names", None))

    @property
    def torch_device(self) -> torch.device:
        """:attr:`device` resolved (``auto`` -> CUDA when available)."""
        return resolve_device(self.device)

    def make_inverter(self, after_bfr: bool) -> Callable:
        """The dipole inversion these options name, on :attr:`torch_device`.

        ``after_bfr``: the local field will come out of background removal (the model's
        recommended data consistency differs; :func:`~qsmnet.inference.dipole.make_inverter`).
        """
        return make_inverter(self.method, self.torch_device, refine_iterations=self.dc_iterations,
                             after_bfr=after_bfr)
