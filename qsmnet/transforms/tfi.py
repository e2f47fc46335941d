"""Total-field inversion (TFI): susceptibility of the brain and of the background at once.

Background removal has to split the total field into the brain's own field and the field of
sources outside the region; whatever it takes of the brain's field, or leaves of the
background, the dipole inversion cannot undo. TFI skips the split: it fits the total field
``f`` on the field support ``M`` (the brain and its CSF rim) with one susceptibility map that
covers ``M`` *and* a band of ``pad`` voxels around it, where the background sources are,

    min_y  1/2 ||W (f - D P y)||^2_M  +  lam || G grad(P y) ||_iso,      chi = P y,

with the dipole convolution ``D`` (periodic on the padded grid), data weights ``W`` (the inverse
of the field's noise, zero where the field is unreliable and outside ``M``), isotropic total
variation on the gradient pairs ``G`` with both ends in ``M``, and the preconditioner ``P``: 1 in
``M`` and ``pb`` outside. Background sources (air, bone) are tens of times stronger than the
brain's contrasts; ``P`` lets the solver reach them in few iterations without changing the
minimiser of the data term (Liu et al. 2017, whose idea this follows).

The TV term is handled by iteratively reweighted least squares: each outer iteration fixes
``Lambda = 1 / sqrt(|grad chi|^2 + eps^2)`` at the current estimate and solves the normal
equations ``(P D W^2 D P + lam P grad^T G Lambda grad P) y = P D W^2 f`` by conjugate gradients,
warm started from the previous estimate. The first solve starts from the outside
susceptibility alone that best explains the field (the PDF problem, ``background_iterations``
CG steps without the TV term): on a real head the background dominates the right-hand side, and
fitting it first leaves the joint solve the brain's own field. The susceptibility in ``M``
then starts from the closed-form L2 inversion of the field the background start leaves
(``inside_start_alpha``), so that the joint iterations refine a whole-brain estimate instead of
building it from zero.

Two uses in qsmnet:

* :func:`total_field_inversion` returns chi on ``M``, the field that chi makes there (the local
  field it explains) and the field of the sources outside ``M`` (the background field);
* :class:`TFIBackground` is a background-removal method (``--bfr tfi``): it returns that local
  field on all of ``M``, and any dipole inversion (the network included) runs on it.

The defaults (``lam``, ``pb``, ``eps``, iteration budgets) were chosen on the tuning subject of
the end-to-end set (seed 2), which is in no evaluation set; the sweep is in the "Total-field
inversion" notes of ``docs/benchmarks.md``.

References
----------
Liu Z., Kee Y., Zhou D., Wang Y., Spincemaille P., "Preconditioned total field inversion
(TFI) method for quantitative susceptibility mapping", MRM 78:303 (2017).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from qsmnet.physics.forward import _crop, _pad, pad_amount
from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.physics.kernels import dipole_kernel
from qsmnet.physics.operators import gradient_adjoint_into, gradient_into
from qsmnet.transforms._grid import (
    Vec3,
    broadcast_mask,
    checked_field,
    crop_box,
    float_dtype,
    map_samples,
    nonempty_box,
    per_sample_vectors,
    prepare_weights,
    uncrop_box,
)
from qsmnet.transforms.base import Transform
from qsmnet.transforms.inversion import l2_filter, reference_to_mask_mean
from qsmnet.transforms.solvers import conjugate_gradient

__all__ = ["TFI_DEFAULTS", "TFIBackground", "tfi_weights", "total_field_inversion"]

#: Defaults of :func:`total_field_inversion` (tuning subject, see the module docstring).
TFI_DEFAULTS = {"lam": 5e-5, "pb": 5.0, "eps": 1e-3, "outer_iterations": 4,
                "cg_iterations": 120, "cg_tol": 1e-6, "pad": 12, "background_iterations": 40,
                "inside_start_alpha": 0.1}

#: Field noise below this fraction of its median in the support is raised to it, so that a
#: few voxels with an implausibly small noise estimate do not carry the data term.
NOISE_FLOOR_FRAC = 0.2


def tfi_weights(mask: torch.Tensor, field_noise_ppm: torch.Tensor | None = None,
                reliable: torch.Tensor | None = None) -> torch.Tensor:
    """Data weights of :func:`total_field_inversion`: ``1 / noise`` on ``mask``, RMS 1 there.

    Parameters
    ----------
    mask : (X, Y, Z) bool tensor
        Field support.
    field_noise_ppm : (X, Y, Z) tensor, optional
        Standard deviation of the field (ppm), e.g. from
        :class:`~qsmnet.transforms.field_mapping.FieldMapping`; floored at
        ``NOISE_FLOOR_FRAC`` times its median in ``mask``. Uniform weights when None.
    reliable : (X, Y, Z) bool or float tensor, optional
        Zero where the field is not to be used (unreliable voxels).

    Returns
    -------
    (X, Y, Z) tensor, zero outside ``mask``.
    """
    m = mask.bool()
    if field_noise_ppm is None:
        w = m.to(torch.float32)
    else:
        noise = torch.as_tensor(field_noise_ppm)
        noise = noise.to(float_dtype(noise))
        inside = noise[m]
        inside = inside[torch.isfinite(inside) & (inside > 0)]
        if inside.numel() == 0:
            raise ValueError("field_noise_ppm has no finite positive value in the mask")
        floor = NOISE_FLOOR_FRAC * float(inside.median())
        safe = torch.where(torch.isfinite(noise) & (noise > floor), noise,
                           torch.full_like(noise, floor))
        w = torch.where(m, 1.0 / safe, torch.zeros_like(safe))
    if reliable is not None:
        w = w * torch.as_tensor(reliable).to(device=w.device, dtype=w.dtype)
    rms = float(w[m].pow(2).mean().sqrt()) if bool(m.any()) else 0.0
    if not rms > 0:
        raise ValueError("the data weights are zero everywhere in the mask")
    return w / rms


def _pair_mask(m: torch.Tensor) -> torch.Tensor:
    """(3, X, Y, Z): forward-difference pairs (i, i+1) with both ends in ``m`` (no wrap)."""
    g = torch.zeros((3, *m.shape), dtype=torch.bool, device=m.device)
    for axis in range(3):
        n = m.shape[axis]
        both = m.narrow(axis, 0, n - 1) & m.narrow(axis, 1, n - 1)
        g[axis].narrow(axis, 0, n - 1).copy_(both)
    return g


def _tfi_single(f, m, vs, b0, w, *, lam, pb, eps, outer_iterations, cg_iterations, cg_tol,
                pad, background_iterations, inside_start_alpha):
    as_voxel_size_mm(vs)
    full = tuple(f.shape)
    box = nonempty_box(m)
    cshape = tuple(crop_box(m, box).shape)
    pads = pad_amount(cshape, pad)
    padded = tuple(n + a + b for n, (a, b) in zip(cshape, pads))
    dt, dev = f.dtype, f.device
    mp = _pad(crop_box(m, box).to(dt), pads) > 0
    fp = _pad(crop_box(f * m.to(dt), box), pads)
    wp = _pad(crop_box(w.to(dt) * m.to(dt), box), pads)
    w2 = wp * wp
    p = torch.where(mp, torch.ones_like(fp), torch.full_like(fp, float(pb)))
    d = dipole_kernel(padded, vs, b0, half=True, dtype=dt, device=dev)
    inv_h = [1.0 / h for h in vs]
    pairs = _pair_mask(mp).to(dt)

    def filtered(x, kernel):
        return torch.fft.irfftn(torch.fft.rfftn(x).mul_(kernel), s=padded)

    conv = functools.partial(filtered, kernel=d)

    # lam and the 1/h^2 of each axis live in the TV weights, so the CG operator takes plain
    # differences and does not scale the three gradient components at every iteration
    unit = (1.0, 1.0, 1.0)
    axis_scale = torch.tensor([lam * h * h for h in inv_h], dtype=dt, device=dev).view(3, 1, 1, 1)
    grad = torch.empty((3, *padded), dtype=dt, device=dev)
    tmp = torch.empty_like(fp)
    out = torch.empty_like(fp)
    py = torch.empty_like(fp)
    lam_weights = torch.empty_like(grad)

    def apply_a(y):
        torch.mul(p, y, out=py)
        data = conv(conv(py).mul_(w2))
        gradient_into(py, grad, unit)
        grad.mul_(lam_weights)
        gradient_adjoint_into(grad, out, unit, tmp)
        return data.add_(out).mul_(p)

    dwf = conv(w2 * fp)
    b = p * dwf
    y = torch.zeros_like(fp)
    if background_iterations > 0:
        # the background start (module docstring): the same normal equations on the outside
        # susceptibility alone, without the TV term
        q = torch.where(mp, torch.zeros_like(p), p)

        def apply_outside(v):
            return conv(conv(q * v).mul_(w2)).mul_(q)

        y, _, _ = conjugate_gradient(apply_outside, q * dwf,
                                     max_iter=int(background_iterations), tol=cg_tol)
    del dwf
    if inside_start_alpha > 0:
        # the inside start (module docstring): the closed-form L2 inversion of what the
        # background leaves of the field where it is used (w > 0), inside the support (P = 1)
        rest = (fp - conv(p * y)).mul_(wp > 0)
        rest = filtered(rest, l2_filter(d, padded, vs, alpha=float(inside_start_alpha)))
        y = torch.where(mp, rest, y)
        del rest
    for _ in range(int(outer_iterations)):
        gradient_into(p * y, grad, inv_h)
        grad.mul_(pairs)
        scale = 1.0 / torch.sqrt(grad.pow(2).sum(dim=0) + eps * eps)
        torch.mul(pairs, scale, out=lam_weights)
        lam_weights.mul_(axis_scale)
        y, _, _ = conjugate_gradient(apply_a, b, x0=y, max_iter=int(cg_iterations), tol=cg_tol)
    chi = p * y
    inside = torch.where(mp, chi, torch.zeros_like(chi))

    def back(x):
        return uncrop_box(_crop(x, pads, cshape), box, full) * m.to(dt)

    return back(chi), back(conv(inside)), back(conv(chi - inside))


def _check(lam, pb, eps, outer_iterations, cg_iterations, background_iterations=0,
           inside_start_alpha=0.0) -> None:
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not pb > 0:
        raise ValueError(f"pb must be > 0, got {pb}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if background_iterations < 0:
        raise ValueError(f"background_iterations must be >= 0, got {background_iterations}")
    if not inside_start_alpha >= 0:
        raise ValueError(f"inside_start_alpha must be >= 0, got {inside_start_alpha}")
    if outer_iterations < 1 or cg_iterations < 1:
        raise ValueError("outer_iterations and cg_iterations must be >= 1, got "
                         f"{outer_iterations} and {cg_iterations}")


def total_field_inversion(total_field_ppm: torch.Tensor, mask: torch.Tensor,
                          voxel_size_mm: Vec3 = (1.0, 1.0, 1.0),
                          b0_dir: Vec3 = (0.0, 0.0, 1.0),
                          weights: torch.Tensor | None = None, *,
                          lam: float = TFI_DEFAULTS["lam"], pb: float = TFI_DEFAULTS["pb"],
                          eps: float = TFI_DEFAULTS["eps"],
                          outer_iterations: int = TFI_DEFAULTS["outer_iterations"],
                          cg_iterations: int = TFI_DEFAULTS["cg_iterations"],
                          cg_tol: float = TFI_DEFAULTS["cg_tol"],
                          pad: int | Sequence[int] = TFI_DEFAULTS["pad"],
                          background_iterations: int = TFI_DEFAULTS["background_iterations"],
                          inside_start_alpha: float = TFI_DEFAULTS["inside_start_alpha"]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preconditioned total-field inversion (module docstring; Liu et al. 2017).

    Parameters
    ----------
    total_field_ppm : (..., X, Y, Z) tensor
        Total field, ppm (background not removed). Only its values in ``mask`` are used.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor
        Field support: where the field is measured (the brain and its CSF rim).
    voxel_size_mm, b0_dir : (3,) or (B, 3)
        Voxel size (mm) and B0 direction (array axes).
    weights : tensor broadcastable to the field, optional
        Data weights ``W`` (>= 0), e.g. :func:`tfi_weights`; the mask when None.
    lam : float
        TV weight, ppm * mm, with ``W`` of RMS 1 in the mask (as TV-ADMM's weighted ``lam``).
    pb : float
        Preconditioner outside the mask (1 inside).
    eps : float
        Smoothing of the isotropic TV, ppm / mm.
    outer_iterations, cg_iterations : int
        Reweighting steps, and conjugate-gradient iterations per step (a fixed budget).
    cg_tol : float
        Relative residual at which a CG solve stops early.
    pad : int or (3,) ints
        Band (voxels per side) around the mask's bounding box where background sources are
        modelled; the grid is rounded up to an FFT-friendly size.
    background_iterations : int
        Conjugate-gradient iterations on the susceptibility outside the mask alone (the PDF
        problem, no TV) that give the joint solve its start; 0 starts from zero.
    inside_start_alpha : float
        Regularisation weight (Laplacian) of the closed-form L2 inversion that starts the
        susceptibility in the mask, from the field the background start leaves; 0 starts it
        from zero.

    Returns
    -------
    chi_ppm : (..., X, Y, Z) tensor
        Susceptibility in the mask, zero mean there, 0 outside.
    local_field_ppm : (..., X, Y, Z) tensor
        Field (ppm) of ``chi_ppm``, in the mask (0 mean there, 0 outside): the local field TFI
        explains. Unlike the total field less the background below, it holds none of the
        noise and field-mapping error that no susceptibility accounts for.
    background_field_ppm : (..., X, Y, Z) tensor
        Field (ppm) of the susceptibility outside the mask, in the mask (0 outside).
    """
    _check(lam, pb, eps, outer_iterations, cg_iterations, background_iterations,
           inside_start_alpha)
    x = checked_field(total_field_ppm, mask, "total_field_ppm")
    mask = torch.as_tensor(mask).bool()
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")
    b0s = per_sample_vectors(b0_dir, lead, "b0_dir")
    w = mask.to(x.dtype) if weights is None else prepare_weights(weights, x)
    one = functools.partial(_tfi_single, lam=float(lam), pb=float(pb), eps=float(eps),
                            outer_iterations=int(outer_iterations),
                            cg_iterations=int(cg_iterations), cg_tol=float(cg_tol), pad=pad,
                            background_iterations=int(background_iterations),
                            inside_start_alpha=float(inside_start_alpha))
    with torch.no_grad():
        chi, local, background = map_samples(one, x, mask, vss, b0s, extra=w)
    mb = broadcast_mask(mask, chi)
    return reference_to_mask_mean(chi, mb), reference_to_mask_mean(local, mb), background


class TFIBackground(Transform):
    """Background removal by total-field inversion (``--bfr tfi``).

    The local field is the field of the susceptibility TFI finds in the mask
    (:func:`total_field_inversion`'s ``local_field_ppm``), on the whole mask: nothing is eroded.
    Subtracting the background field from the total field instead leaves in the local field
    all of the noise and field-mapping error, which is of the order of the brain's own field
    (the "Total-field inversion" notes of ``docs/benchmarks.md``).

    Dict keys: total_field_ppm, mask, voxel_size_mm, b0_dir -> local_field_ppm, mask; with
    ``return_chi``, also chi_ppm (TFI's own chi on the mask, zero mean there).
    """

    input_keys = {"field_ppm": "total_field_ppm", "mask": "mask",
                  "voxel_size_mm": "voxel_size_mm", "b0_dir": "b0_dir"}
    output_keys = ("local_field_ppm", "mask")

    def __init__(self, lam: float = TFI_DEFAULTS["lam"], pb: float = TFI_DEFAULTS["pb"],
                 eps: float = TFI_DEFAULTS["eps"],
                 outer_iterations: int = TFI_DEFAULTS["outer_iterations"],
                 cg_iterations: int = TFI_DEFAULTS["cg_iterations"],
                 cg_tol: float = TFI_DEFAULTS["cg_tol"], pad: int = TFI_DEFAULTS["pad"],
                 background_iterations: int = TFI_DEFAULTS["background_iterations"],
                 inside_start_alpha: float = TFI_DEFAULTS["inside_start_alpha"],
                 return_chi: bool = False) -> None:
        _check(lam, pb, eps, outer_iterations, cg_iterations, background_iterations,
               inside_start_alpha)
        self.params = {"lam": lam, "pb": pb, "eps": eps, "outer_iterations": outer_iterations,
                       "cg_iterations": cg_iterations, "cg_tol": cg_tol, "pad": pad,
                       "background_iterations": background_iterations,
                       "inside_start_alpha": inside_start_alpha}
        self.return_chi = bool(return_chi)
        if self.return_chi:
            self.output_keys = (*type(self).output_keys, "chi_ppm")

    def __call__(self, field_ppm, mask, voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                 weights=None, field_noise_ppm=None):
        """``weights``: zero where the field is unreliable (optional); ``field_noise_ppm``:
        the field's noise, whose inverse weighs the data (:func:`tfi_weights`)."""
        mask = torch.as_tensor(mask).bool()
        if mask.ndim == 3 and torch.as_tensor(field_ppm).ndim == 3:
            w = tfi_weights(mask, field_noise_ppm, weights)
        elif field_noise_ppm is None and weights is None:
            w = None
        else:
            raise ValueError("TFIBackground: noise and reliability weights need one (X, Y, Z) "
                             "subject at a time")
        chi, local, _ = total_field_inversion(field_ppm, mask, voxel_size_mm, b0_dir, w,
                                              **self.params)
        return (local, mask, chi) if self.return_chi else (local, mask)

    def __repr__(self) -> str:
        return "TFIBackground(" + ", ".join(f"{k}={v:g}" for k, v in self.params.items()) + ")"
