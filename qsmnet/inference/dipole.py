"""Dipole inversion methods behind one interface: ``local field (ppm) -> chi (ppm)``.

``make_inverter(method)`` returns a callable
``inverter(local_field_ppm, mask, voxel_size_mm, b0_dir) -> chi_ppm`` on ``(X, Y, Z)`` tensors,
for ``tkd``, ``l2``, ``tv`` (the classical baselines; ``tv`` with the data term on the brain
mask, :func:`~qsmnet.transforms.inversion.tv_brain_data`), ``unet`` (the shipped network) or a
path to a trained model (``.pt`` release file or ``.ckpt`` checkpoint). ``tfi`` is the chi
of the total-field inversion itself (:class:`TFIChi`): it needs the total field, so it only runs
with background removal ``tfi``, whose solve gives that chi.

The network path crops to the mask's bounding box plus a margin, pads to the U-Net divisor, runs
the network (which sees the sample's own B0 direction and voxel size through its kernel-aware
TKD / L2 / TV input channels), optionally refines the result against the measured field with the
exact dipole kernel of this acquisition (:func:`dc_refine`), and restores the full grid. The
classical methods take the same refinement (``refine_iterations``), so that the network can be
compared with its own first estimate plus refinement.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qsmnet.inference.cropping import plan_crop_pad
from qsmnet.inference.model_store import load_network
from qsmnet.io.errors import QSMInputError
from qsmnet.physics.forward import DipoleConvolution
from qsmnet.transforms.inversion import (
    closed_form_l2,
    reference_to_mask_mean,
    tkd,
    tv_brain_data,
)
from qsmnet.transforms.solvers import conjugate_gradient

#: the classical inversions by method name
CLASSICAL_FUNCTIONS = {"tkd": tkd, "l2": closed_form_l2, "tv": tv_brain_data}
CLASSICAL_METHODS = tuple(CLASSICAL_FUNCTIONS)


def dc_refine(chi0: torch.Tensor, local_field_ppm: torch.Tensor, mask: torch.Tensor,
              voxel_size_mm, b0_dir, weight: float = 0.05, iterations: int = 10,
              pad: int | str = 16) -> torch.Tensor:
    """Test-time data consistency: pull ``chi0`` towards the measured field.

    Solves ``min_chi ||M (D chi - f)||^2 + weight ||chi - chi0||^2`` by conjugate gradients
    started at ``chi0`` (``(D M D + weight I) chi = D M f + weight chi0``), with the exact dipole
    kernel of this acquisition (B0 direction, voxel size). The k-space directions the field
    determines well are corrected towards the data; in the cone of the kernel, where the data say
    little, ``chi0`` (the network's answer) stays. ``weight`` sets the balance.
    """
    op = DipoleConvolution(pad=pad)
    m = mask.to(chi0.dtype)
    f = local_field_ppm * m

    def apply_a(x):
        return op(m * op(x, voxel_size_mm, b0_dir), voxel_size_mm, b0_dir) + weight * x

    b = op(m * f, voxel_size_mm, b0_dir) + weight * chi0
    chi, _, _ = conjugate_gradient(apply_a, b, x0=chi0, max_iter=iterations, tol=1e-6)
    return chi


@dataclass
class NetworkInverter:
    """The network as a dipole inversion on whole volumes of any shape.

    Parameters
    ----------
    net : QSMNet
    margin : voxels kept around the mask's bounding box.
    refine_iterations : conjugate-gradient iterations of :func:`dc_refine` (0: off).
    refine_weight : the prior weight of :func:`dc_refine`.
    metadata : what the model file says about itself (recorded in outputs).
    """

    net: torch.nn.Module
    margin: int = 8
    refine_iterations: int = 0
    refine_weight: float = 0.05
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return {"margin": self.margin, "refine_iterations": self.refine_iterations,
                "refine_weight": self.refine_weight,
                "model": self.metadata.get("name", self.metadata.get("source", "")),
                "model_config": self.net.get_config()}

    @property
    def needs_magnitude(self) -> bool:
        """Whether the network takes the magnitude as an input channel (``magnitude``)."""
        return "magnitude" in self.net.inputs.channels

    def require_magnitude(self, magnitude: Any) -> None:
        """Refuse a missing magnitude when the network needs it (one message, naming the model)."""
        if self.needs_magnitude and magnitude is None:
            name = self.params["model"]
            raise QSMInputError(f"the model{' ' + str(name) if name else ''} takes the magnitude "
                                "as an input channel: start from phase and give the multi-echo "
                                "magnitude (--magnitude, or the BIDS / QSM-CI magnitude images)")

    @torch.no_grad()
    def __call__(self, local_field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size_mm,
                 b0_dir, magnitude: torch.Tensor | None = None) -> torch.Tensor:
        """chi (ppm) on the field's ``(X, Y, Z)`` grid. ``magnitude`` ``(X, Y, Z)`` (any scale;
        :func:`~qsmnet.models.inputs.magnitude_prior_from_echoes` of the multi-echo magnitude)
        is required by, and only used by, a network with a ``magnitude`` input channel."""
        device = next(self.net.parameters()).device
        f = local_field_ppm.to(device=device, dtype=torch.float32)
        m = mask.to(device=device, dtype=torch.bool)
        plan = plan_crop_pad(m, divisor=self.net.size_divisor, margin=self.margin)
        fc = plan.apply(f * m)[None, None]
        mc = plan.apply(m.to(torch.float32))[None, None]
        vs = torch.as_tensor(voxel_size_mm, dtype=torch.float64).reshape(3)
        b0 = torch.as_tensor(b0_dir, dtype=torch.float64).reshape(3)
        provided = None
        if self.needs_magnitude:
            self.require_magnitude(magnitude)
            if tuple(magnitude.shape) != tuple(f.shape):
                raise QSMInputError(f"the magnitude prior has shape {tuple(magnitude.shape)}, "
                                    f"the field {tuple(f.shape)}")
            mag = magnitude.to(device=device, dtype=torch.float32)
            provided = {"magnitude": plan.apply(mag)[None, None]}
        chi, _ = self.net.predict(fc, mc, vs, b0, provided=provided)
        if self.refine_iterations > 0:
            chi = dc_refine(chi, fc, mc, vs, b0, self.refine_weight, self.refine_iterations)
        chi = reference_to_mask_mean(chi, mc)
        return plan.restore(chi[0, 0]).to(local_field_ppm.device)


#: the method whose chi is the total-field inversion's own (``--method tfi`` with ``--bfr tfi``)
TFI_METHOD = "tfi"


@dataclass
class TFIChi:
    """``--method tfi``: chi is the one the total-field inversion fits in background removal
    (:func:`qsmnet.transforms.tfi.total_field_inversion`), not an inversion of its local field.

    The pipeline reads that chi from the sample (key :attr:`chi_key`) instead of calling this;
    called on a local field alone, it refuses: TFI needs the total field.
    """

    name: str = TFI_METHOD
    chi_key: str = "tfi_chi_ppm"

    @property
    def params(self) -> dict[str, Any]:
        return {"chi": "total-field inversion (the settings of background removal tfi)"}

    def __call__(self, local_field_ppm, mask, voxel_size_mm, b0_dir) -> torch.Tensor:
        raise QSMInputError("--method tfi: chi comes from the total-field inversion of the total "
                            "field (--bfr tfi, from phase or a total field map), not from a local "
                            "field")


#: prior weight of the data-consistency refinement after a classical inversion (the shipped
#: network's, so that ``--method tv --dc-iterations 40`` is the network-free twin of ``unet``)
CLASSICAL_REFINE_WEIGHT = 0.002


@dataclass
class ClassicalInverter:
    """A classical inversion with fixed parameters, optionally followed by the same test-time
    data consistency as the networks (:func:`dc_refine`, ``refine_iterations`` > 0)."""

    name: str
    fn: Callable
    fn_params: dict[str, Any] = field(default_factory=dict)
    refine_iterations: int = 0
    refine_weight: float = CLASSICAL_REFINE_WEIGHT

    @property
    def params(self) -> dict[str, Any]:
        """What runs (recorded in outputs): the function's arguments and any refinement."""
        refine = ({"refine_iterations": self.refine_iterations, "refine_weight": self.refine_weight}
                  if self.refine_iterations > 0 else {})
        return {**self.fn_params, **refine}

    @torch.no_grad()
    def __call__(self, local_field_ppm, mask, voxel_size_mm, b0_dir) -> torch.Tensor:
        vs = tuple(float(v) for v in torch.as_tensor(voxel_size_mm).reshape(3))
        b0 = tuple(float(v) for v in torch.as_tensor(b0_dir).reshape(3))
        m = mask.to(torch.bool)
        chi = self.fn(local_field_ppm, m, vs, b0, **self.fn_params)
        if self.refine_iterations <= 0:
            return chi
        plan = plan_crop_pad(m, divisor=1, margin=8)
        mc = plan.apply(m.to(chi.dtype))[None, None]
        fc = plan.apply(local_field_ppm.to(chi.dtype) * m)[None, None]
        vs_t = torch.tensor(vs, dtype=torch.float64)
        b0_t = torch.tensor(b0, dtype=torch.float64)
        out = dc_refine(plan.apply(chi)[None, None], fc, mc, vs_t, b0_t, self.refine_weight,
                        self.refine_iterations)
        return plan.restore(reference_to_mask_mean(out, mc)[0, 0])


def make_inverter(method: str | os.PathLike = "unet", device: str | torch.device = "cpu",
                  refine_iterations: int | None = None, after_bfr: bool = False,
                  **params) -> Callable:
    """Build the dipole inversion named ``method`` (see module docstring).

    ``params`` go to the classical function (e.g. ``threshold`` for tkd, ``alpha`` for l2,
    ``lam``/``max_iter`` for tv) or to :class:`NetworkInverter` (``margin``, ``refine_weight``).
    For networks, ``refine_iterations`` defaults to what the model file recommends: its metadata
    ``refine_iterations`` for an exact local field, or ``refine_iterations_after_bfr`` when
    ``after_bfr`` (the local field comes out of background removal, whose errors a strong data
    term would fit; the shipped model's setting is 0, chosen on simulated validation fields);
    else 0. Classical methods default to 0 and, when it is given, are refined the same way
    (weight :data:`CLASSICAL_REFINE_WEIGHT` unless ``refine_weight``).
    """
    method = os.fspath(method)
    if refine_iterations is not None and refine_iterations < 0:
        raise QSMInputError(f"the number of data-consistency iterations must be >= 0, got "
                            f"{refine_iterations}")
    if method == TFI_METHOD:
        if refine_iterations:
            raise QSMInputError("--dc-iterations: not used with --method tfi (its chi fits the "
                                "total field already)")
        return TFIChi()
    if method in CLASSICAL_METHODS:
        fn = CLASSICAL_FUNCTIONS[method]
        weight = float(params.pop("refine_weight", CLASSICAL_REFINE_WEIGHT))
        return ClassicalInverter(method, fn, params, int(refine_iterations or 0), weight)
    if method != "unet" and not method.endswith((".pt", ".ckpt")):
        raise QSMInputError(f"unknown method {method!r}: use unet, tkd, l2, tv, tfi or a model "
                            "file (.pt / .ckpt)")
    net, meta = load_network(method, device)
    if refine_iterations is None:
        key = ("refine_iterations_after_bfr"
               if after_bfr and "refine_iterations_after_bfr" in meta else "refine_iterations")
        refine_iterations = int(meta.get(key, 0))
    params.setdefault("refine_weight", float(meta.get("refine_weight", 0.05)))
    return NetworkInverter(net, refine_iterations=refine_iterations, metadata=meta, **params)
