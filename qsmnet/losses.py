"""Physics-informed training loss: supervised chi term + data consistency + gradient term.

``total = w_sup * L_sup + w_dc * L_dc + w_grad * L_grad``, all averaged over mask voxels of the
whole batch, in ppm (chi) and ppm (field) units:

* ``L_sup`` - L1 (``sup="l1"``, mean absolute error) or L2 (``sup="l2"``, mean squared error)
  between prediction and truth, **both referenced to their mean inside the mask**. The dipole
  kernel has ``D(0) = 0``, so the mean of chi inside the mask is not determined by the field;
  comparing referenced maps makes the target well defined whatever reference the data simulator
  used, and matches how outputs are reported (QSM-CI NRMSE is demeaned too).
* ``L_dc`` - data consistency ``|| M (D chi_hat - f) ||`` through
  :class:`qsmnet.physics.forward.DipoleConvolution` with each sample's own B0 direction and voxel
  size (zero-padded, so dipole tails do not wrap). ``dc_norm="l2"`` is the root-mean-square
  residual over the mask (the norm itself, so its gradient is O(1) like the L1 terms),
  ``dc_norm="l1"`` the mean absolute residual. With ``dc_free_mean=True`` (default) the residual
  is taken after the best constant ``c`` inside the mask (``chi_hat + c M``, least squares, one
  extra dipole convolution of the mask): this keeps the term consistent with the free mean,
  so a referenced prediction of the truth has zero DC residual even when the truth is not
  zero-mean in the mask (a uniform ``c M`` does produce a field near the mask edge).
* ``L_grad`` - mean absolute difference between the voxel-size-scaled forward differences
  (ppm/mm) of prediction and truth, over neighbour pairs that both lie in the mask.

Terms with zero weight are still computed (without autograd) so every run logs every component.
"""

from __future__ import annotations

import torch
from torch import nn

from qsmnet.models.inputs import as_batch_geometry
from qsmnet.physics.forward import DipoleConvolution
from qsmnet.transforms.inversion import reference_to_mask_mean

_DIMS = (-3, -2, -1)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x * weight).sum() / weight.sum().clamp_min(1.0)


def voxel_gradient(x: torch.Tensor, voxel_size_mm: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences ``(x[i+1] - x[i]) / voxel_size`` along X, Y, Z for ``(B, C, X, Y, Z)``
    with per-sample ``(B, 3)`` voxel sizes. The last slice of each axis (no neighbour) is 0."""
    out = []
    batch = x.shape[0]
    for axis, dim in enumerate(_DIMS):
        h = voxel_size_mm[:, axis].to(x.dtype).reshape(batch, *([1] * (x.ndim - 1)))
        d = torch.zeros_like(x)
        n = x.shape[dim]
        d.narrow(dim, 0, n - 1).copy_((x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)))
        out.append(d / h)
    return out


def pair_masks(mask: torch.Tensor) -> list[torch.Tensor]:
    """For each axis, 1 where a voxel and its next neighbour along that axis are both in the mask."""
    out = []
    for dim in _DIMS:
        p = torch.zeros_like(mask)
        n = mask.shape[dim]
        p.narrow(dim, 0, n - 1).copy_(mask.narrow(dim, 0, n - 1) * mask.narrow(dim, 1, n - 1))
        out.append(p)
    return out


class QSMLoss(nn.Module):
    """Weighted supervised + data-consistency + gradient loss (see module docstring).

    Parameters
    ----------
    w_sup : float
        Weight of the supervised chi term (0 gives a purely physics-driven, unsupervised loss).
    sup : "l1" | "l2"
    w_dc : float
        Weight of the data-consistency term.
    dc_norm : "l2" | "l1"
    w_grad : float
        Weight of the gradient-difference term.
    pad : "auto" | int | None
        Zero padding of the dipole convolution (see :func:`qsmnet.physics.forward.pad_amount`).
    dc_free_mean : bool
        Remove the best constant inside the mask before taking the DC norm.

    Call ``loss(chi_pred, chi_true, local_field_ppm, mask, voxel_size_mm, b0_dir)`` with
    ``(B, 1, X, Y, Z)`` tensors and ``(B, 3)`` (or ``(3,)``) geometry; returns
    ``(total, {"sup": ..., "dc": ..., "grad": ...})`` (components detached).
    """

    def __init__(self, w_sup: float = 1.0, sup: str = "l1", w_dc: float = 0.5, dc_norm: str = "l2",
                 w_grad: float = 0.1, pad: str | int | None = "auto", dc_free_mean: bool = True) -> None:
        super().__init__()
        if sup not in ("l1", "l2"):
            raise ValueError(f"sup must be 'l1' or 'l2', got {sup!r}")
        if dc_norm not in ("l1", "l2"):
            raise ValueError(f"dc_norm must be 'l1' or 'l2', got {dc_norm!r}")
        if min(w_sup, w_dc, w_grad) < 0 or (w_sup == 0 and w_dc == 0 and w_grad == 0):
            raise ValueError(f"weights must be >= 0 and not all 0, got {(w_sup, w_dc, w_grad)}")
        self.w_sup, self.w_dc, self.w_grad = float(w_sup), float(w_dc), float(w_grad)
        self.sup, self.dc_norm = sup, dc_norm
        self.pad = pad
        self.dc_free_mean = bool(dc_free_mean)
        self.dipole = DipoleConvolution(pad=pad)

    def get_config(self) -> dict:
        """Constructor arguments as a plain dict."""
        return {"w_sup": self.w_sup, "sup": self.sup, "w_dc": self.w_dc, "dc_norm": self.dc_norm,
                "w_grad": self.w_grad, "pad": self.pad, "dc_free_mean": self.dc_free_mean}

    # -- terms ------------------------------------------------------------------------------
    def supervised(self, chi_pred: torch.Tensor, chi_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        diff = reference_to_mask_mean(chi_pred, mask) - reference_to_mask_mean(chi_true, mask)
        err = diff.abs() if self.sup == "l1" else diff * diff
        return _masked_mean(err, mask)

    def dc_residual(self, chi_pred: torch.Tensor, local_field_ppm: torch.Tensor, mask: torch.Tensor,
                    voxel_size_mm: torch.Tensor, b0_dir: torch.Tensor) -> torch.Tensor:
        """``M (D chi_hat - f)`` (minus the best ``c M D M`` when ``dc_free_mean``), ppm."""
        r = mask * (self.dipole(chi_pred, voxel_size_mm, b0_dir) - local_field_ppm)
        if self.dc_free_mean:
            g = mask * self.dipole(mask, voxel_size_mm, b0_dir)
            gg = (g * g).sum(dim=_DIMS, keepdim=True)
            c = (r * g).sum(dim=_DIMS, keepdim=True) / gg.clamp_min(1e-12)
            r = r - c * g
        return r

    def data_consistency(self, chi_pred, local_field_ppm, mask, voxel_size_mm, b0_dir) -> torch.Tensor:
        r = self.dc_residual(chi_pred, local_field_ppm, mask, voxel_size_mm, b0_dir)
        if self.dc_norm == "l1":
            return _masked_mean(r.abs(), mask)
        return torch.sqrt(_masked_mean(r * r, mask) + 1e-20)

    def gradient(self, chi_pred: torch.Tensor, chi_true: torch.Tensor, mask: torch.Tensor,
                 voxel_size_mm: torch.Tensor) -> torch.Tensor:
        gp = voxel_gradient(chi_pred, voxel_size_mm)
        gt = voxel_gradient(chi_true, voxel_size_mm)
        pm = pair_masks(mask)
        num = sum(((a - b).abs() * p).sum() for a, b, p in zip(gp, gt, pm))
        den = sum(p.sum() for p in pm).clamp_min(1.0)
        return num / den

    # -- total ------------------------------------------------------------------------------
    def forward(self, chi_pred: torch.Tensor, chi_true: torch.Tensor, local_field_ppm: torch.Tensor,
                mask: torch.Tensor, voxel_size_mm, b0_dir) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if chi_pred.shape != chi_true.shape or chi_pred.shape != local_field_ppm.shape:
            raise ValueError(f"shape mismatch: pred {tuple(chi_pred.shape)}, truth {tuple(chi_true.shape)}, "
                             f"field {tuple(local_field_ppm.shape)}")
        batch = chi_pred.shape[0]
        vs = as_batch_geometry(voxel_size_mm, batch, "voxel_size_mm", chi_pred.device)
        bd = as_batch_geometry(b0_dir, batch, "b0_dir", chi_pred.device)
        m = mask.to(chi_pred.dtype).reshape(chi_pred.shape)
        terms = {
            "sup": (self.w_sup, lambda: self.supervised(chi_pred, chi_true, m)),
            "dc": (self.w_dc, lambda: self.data_consistency(chi_pred, local_field_ppm, m, vs, bd)),
            "grad": (self.w_grad, lambda: self.gradient(chi_pred, chi_true, m, vs)),
        }
        total = chi_pred.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        for name, (w, fn) in terms.items():
            if w > 0:
                value = fn()
                total = total + w * value
            else:
                with torch.no_grad():
                    value = fn()
            parts[name] = value.detach()
        return total, parts

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
