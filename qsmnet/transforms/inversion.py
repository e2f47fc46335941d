"""Classical dipole inversions: local field (ppm) -> susceptibility (ppm).

All share one interface, the one the network has: a callable on ``local_field_ppm``
``(..., X, Y, Z)`` with ``mask``, ``voxel_size_mm`` and ``b0_dir`` (``(3,)`` or ``(B, 3)``),
returning chi referenced to its mean inside the mask (the dipole kernel has ``D(0) = 0``, so the
mean of chi is not determined by the field).

Grid
----
With a mask, each sample is cropped to the bounding box of its mask and zero padded by ``pad``
voxels per side (rounded up to an FFT-friendly size, :func:`qsmnet.physics.forward.pad_amount`);
the solution is computed with ``rfftn`` on that grid and put back on the input grid. The field is
multiplied by the mask first, so nothing outside the mask is used. Without a mask the whole
volume is padded. Every sample of a batch is solved on its own grid with its own geometry, so a
batched call equals the per-sample calls.

Methods
-------
* :func:`tkd` — truncated k-space division (Shmueli 2009; Wharton 2010).
* :func:`closed_form_l2` — Tikhonov with a gradient penalty, closed form (Bilgic 2014 JMRI).
* :func:`tv_admm` — total variation by ADMM (Bilgic 2014 MRM), optionally with data weights
  (magnitude / inverse noise) through a second split.
  References: Bilgic B. et al., "Fast quantitative susceptibility mapping with
  L1-regularization and automatic parameter selection", MRM 72:1444 (2014); Boyd S. et al.,
  Found. Trends Mach. Learn. 3:1 (2011) for scaled ADMM; Milovic C. et al., MRM 80:814 (2018)
  (FANSI) for the weighted data split.

Defaults (TKD threshold 0.15, L2 alpha 0.01 mm^2, TV lambda 2e-4 (5e-5 weighted) with
rho = 100 lambda, 12 voxels of padding) were chosen by a sweep on the qsm-forward head phantoms of
:mod:`qsmnet.simulation.qsmforward_acquisition` (axial 1 mm, B0 tilted 25 deg, 1x1x2 mm; scored
from the true local field); the sweeps are in the 'Classical dipole inversions' section of
``docs/benchmarks.md``, see also ``scripts/bench_bfr_inversion.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from qsmnet.physics.geometry import as_voxel_size_mm
from qsmnet.physics.forward import _crop, _pad, pad_amount
from qsmnet.physics.kernels import dipole_kernel, laplacian_eigenvalues
from qsmnet.physics.operators import gradient_adjoint_into, gradient_into
from qsmnet.transforms._grid import (
    PadArg,
    broadcast_mask,
    crop_box,
    float_dtype,
    map_samples,
    nonempty_box,
    per_sample_vectors,
    prepare_weights,
    uncrop_box,
)
from qsmnet.transforms.base import Transform

#: Default zero padding (voxels per side, around the mask bounding box) of the inversions.
DEFAULT_INVERSION_PAD = 12

#: TV-ADMM weights (ppm * mm) without and with data weights, from the phantom sweeps.
DEFAULT_TV_LAMBDA = 2e-4
DEFAULT_TV_LAMBDA_WEIGHTED = 5e-5

# |D| below this counts as exactly 0 (the kernel's float32 round-off is ~3e-8).
_CONE_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# Referencing and the crop / pad grid (grid helpers: :mod:`qsmnet.transforms._grid`)
# --------------------------------------------------------------------------------------------

def reference_to_mask_mean(chi: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Subtract the mean of chi inside ``mask`` (per sample) and zero chi outside the mask."""
    if mask is None:
        return chi - chi.mean(dim=(-3, -2, -1), keepdim=True)
    m = mask.to(chi.dtype)
    n = m.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1.0)
    mean = (chi * m).sum(dim=(-3, -2, -1), keepdim=True) / n
    return (chi - mean) * m




def _prepare_grid(x: torch.Tensor, mask: torch.Tensor | None, pad: PadArg):
    """Crop ``x`` (3-D) to the mask bbox and zero pad; returns (padded, pads, box, padded_shape)."""
    if mask is not None:
        box = nonempty_box(mask)
        xc = crop_box(x * mask.to(x.dtype), box)
    else:
        box = tuple(slice(0, n) for n in x.shape[-3:])
        xc = x
    cshape = tuple(xc.shape[-3:])
    pads = pad_amount(cshape, pad)
    padded_shape = [n + a + b for n, (a, b) in zip(cshape, pads)]
    return _pad(xc, pads), pads, box, cshape, padded_shape


def _finish_grid(y: torch.Tensor, pads, box, cshape, full_shape) -> torch.Tensor:
    return uncrop_box(_crop(y, pads, cshape), box, full_shape)


# Direct (one-shot) inversions
# --------------------------------------------------------------------------------------------

def _spectral_solve(field: torch.Tensor, filt_fn, voxel_size, b0_dir, pad) -> torch.Tensor:
    """Filter ``field`` (``(..., X, Y, Z)``, one geometry) with ``filt_fn(D, padded_shape)``."""
    shape = tuple(field.shape[-3:])
    pads = pad_amount(shape, pad)
    padded = [n + a + b for n, (a, b) in zip(shape, pads)]
    d = dipole_kernel(padded, voxel_size, b0_dir, half=True, dtype=field.dtype, device=field.device)
    filt = filt_fn(d, padded)
    if filt.ndim == 4 and field.ndim > 4:
        filt = filt.reshape(filt.shape[0], *([1] * (field.ndim - 4)), *filt.shape[1:])
    spec = torch.fft.rfftn(_pad(field, pads), dim=(-3, -2, -1))
    out = torch.fft.irfftn(spec * filt, s=padded, dim=(-3, -2, -1))
    return _crop(out, pads, shape)


def _direct_inversion(local_field_ppm, mask, voxel_size_mm, b0_dir, pad, filt_fn):
    """Per-sample crop -> pad -> filter -> crop back -> reference, for TKD / L2."""
    x = local_field_ppm
    if x.ndim < 3:
        raise ValueError(f"local_field_ppm must be (..., X, Y, Z), got shape {tuple(x.shape)}")
    x = x.to(float_dtype(x))
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")
    b0s = per_sample_vectors(b0_dir, lead, "b0_dir")
    full = tuple(x.shape[-3:])

    def one(f, m, vs, b0, _extra):
        as_voxel_size_mm(vs)
        if m is not None:
            box = nonempty_box(m)
            fc = crop_box(f * m.to(f.dtype), box)
        else:
            box = tuple(slice(0, n) for n in full)
            fc = f
        chi = _spectral_solve(fc, lambda d, shape: filt_fn(d, shape, vs), vs, b0, pad)
        return uncrop_box(chi, box, full)

    (chi,) = map_samples(one, x, mask, vss, b0s)
    return reference_to_mask_mean(chi, None if mask is None else broadcast_mask(mask, chi))


def tkd(local_field_ppm: torch.Tensor, mask: torch.Tensor | None = None,
        voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
        b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0), threshold: float = 0.15,
        pad: PadArg = DEFAULT_INVERSION_PAD) -> torch.Tensor:
    """Truncated k-space division.

    ``chi = IFFT(F * Dinv)`` with ``Dinv = 1/D`` where ``|D| > threshold`` and
    ``sign(D)/threshold`` elsewhere (``sign(0) = +1``, as in QSM.jl; ``|D| <= 1e-6`` counts as
    0, so that points on the magic-angle cone do not take a sign from round-off). No correction
    factor is applied (TKD underestimates chi by about ``mean(D * Dinv)``, 0.82 at 0.15).

    Parameters
    ----------
    local_field_ppm : (..., X, Y, Z) tensor
        Local (tissue) field, ppm.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor, optional
        Region to reconstruct; the field is masked before the transform, each sample is cropped
        to its mask's bounding box, and chi is zero outside.
    voxel_size_mm, b0_dir : (3,) or (B, 3)
        Voxel size (mm) and B0 direction (array axes).
    threshold : float
        Truncation level of ``|D|``; 0.15 (the common default), the best of a sweep on the head
        phantom (see the 'Classical dipole inversions' section of docs/benchmarks.md).
    pad : int, (3,) ints, "auto" or None
        Zero padding per side around the cropped volume, voxels (see
        :func:`qsmnet.physics.forward.pad_amount`).

    Returns
    -------
    (..., X, Y, Z) tensor: chi in ppm, zero mean inside the mask, 0 outside. Differentiable.

    References
    ----------
    Shmueli K. et al., MRM 62:1510 (2009); Wharton S. et al., MRM 63:1292 (2010).
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")

    def filt(d, _shape, _vs):
        # On the magic-angle cone D is exactly 0 but computes as +-1e-17 (float64) or +-3e-8
        # (float32); treat |D| <= 1e-6 as 0 so that sign(0) = +1 does not depend on round-off.
        sign = torch.where(d > -_CONE_TOL, torch.ones_like(d), -torch.ones_like(d))
        safe = torch.where(d.abs() > threshold, d, sign * threshold)
        return 1.0 / safe

    return _direct_inversion(local_field_ppm, mask, voxel_size_mm, b0_dir, pad, filt)


def closed_form_l2(local_field_ppm: torch.Tensor, mask: torch.Tensor | None = None,
                   voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
                   b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0),
                   alpha: float = 0.01, pad: PadArg = DEFAULT_INVERSION_PAD) -> torch.Tensor:
    """Closed-form L2 inversion with gradient regularisation (Bilgic 2014).

    Solves ``min_chi ||D chi - f||^2 + alpha ||grad chi||^2`` on the padded grid:
    ``chi = IFFT( D F / (D^2 + alpha |E|^2) )`` where ``|E|^2`` is the spectrum of
    ``grad^T grad`` for the periodic forward-difference gradient *scaled by voxel size*
    (:func:`qsmnet.physics.kernels.laplacian_eigenvalues`), so ``alpha`` has units of mm^2 and
    means the same on anisotropic grids. ``alpha = 0`` gives the pseudo-inverse ``F / D``
    (0 where ``D = 0``).

    Parameters
    ----------
    local_field_ppm, mask, voxel_size_mm, b0_dir, pad
        As in :func:`tkd`.
    alpha : float
        Regularisation weight, mm^2. Default 0.01: in a sweep on the head phantoms it tied with
        0.005 on mean NRMSE and was better on the tilted case and in XSIM (see the 'Classical
        dipole inversions' section of docs/benchmarks.md).

    Returns
    -------
    (..., X, Y, Z) tensor: chi in ppm, zero mean inside the mask. Differentiable.

    References
    ----------
    Bilgic B. et al., "Fast image reconstruction with L2-regularization", JMRI 40:181 (2014).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    filt = functools.partial(l2_filter, alpha=alpha)
    return _direct_inversion(local_field_ppm, mask, voxel_size_mm, b0_dir, pad, filt)


def l2_filter(d: torch.Tensor, shape: Sequence[int], vs, *, alpha: float) -> torch.Tensor:
    """The closed-form L2 inversion's filter ``D / (D^2 + alpha |grad|^2)`` (0 where both
    vanish) for the dipole spectrum ``d`` of the grid ``shape`` (rfftn layout), voxel size
    ``vs`` (mm): :func:`closed_form_l2` on a grid the caller has already padded."""
    e2 = -laplacian_eigenvalues(shape, vs, half=True, dtype=d.dtype, device=d.device)
    den = d * d + alpha * e2
    return torch.where(den > 0, d / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))


# --------------------------------------------------------------------------------------------
# TV-ADMM
# --------------------------------------------------------------------------------------------

def _tv_admm_single(f, m, vs, b0, w, *, lam, rho, mu, max_iter, tol, pad):
    as_voxel_size_mm(vs)
    full = tuple(f.shape)
    fp, pads, box, cshape, padded = _prepare_grid(f, m, pad)
    dt, dev = fp.dtype, fp.device
    d = dipole_kernel(padded, vs, b0, half=True, dtype=dt, device=dev)
    e2 = -laplacian_eigenvalues(padded, vs, half=True, dtype=dt, device=dev)
    inv_h = [1.0 / h for h in vs]
    s = tuple(padded)
    rfft = lambda a: torch.fft.rfftn(a)  # noqa: E731
    irfft = lambda a: torch.fft.irfftn(a, s=s)  # noqa: E731

    weighted = w is not None
    if weighted:
        wp = _pad(crop_box(w * (m.to(dt) if m is not None else 1.0), box), pads)
        w2 = wp * wp
        den = mu * d * d + rho * e2
    else:
        den = d * d + rho * e2
    ia = torch.where(den > 0, 1.0 / torch.where(den > 0, den, torch.ones_like(den)),
                     torch.zeros_like(den))
    fhat = rfft(fp)
    if weighted:
        # v = D chi (data split), s2 its scaled dual; start from the unweighted closed form.
        chi = irfft(fhat * d / torch.where(d * d + rho * e2 > 0, d * d + rho * e2,
                                           torch.ones_like(d)))
        v = fp.clone()
        s2 = torch.zeros_like(fp)
        w2f = w2 * fp
    else:
        base = ia * d * fhat
        chi = irfft(base)
    z = torch.empty((3, *s), dtype=dt, device=dev)
    u = torch.zeros_like(z)
    g = torch.empty_like(z)
    tmp = torch.empty_like(fp)
    rhs = torch.empty_like(fp)
    gradient_into(chi, z, inv_h)
    thr = lam / rho
    iters = 0
    for iters in range(1, max_iter + 1):
        # x-update: (D^2 + rho E^2) chi = D f + rho grad^T (z - u)   [weighted: mu D (v - s2)]
        torch.sub(z, u, out=g)
        gradient_adjoint_into(g, rhs, inv_h, tmp)
        spec = rfft(rhs).mul_(rho)
        if weighted:
            spec.addcmul_(rfft(v - s2), d, value=mu)
            spec.mul_(ia)
        else:
            spec.mul_(ia).add_(base)
        chi_new = irfft(spec)
        # z-update (anisotropic shrinkage) and dual ascent.
        gradient_into(chi_new, g, inv_h)
        g.add_(u)                                   # g = grad chi + u
        torch.clamp(g, -thr, thr, out=z)
        torch.sub(g, z, out=z)                      # z = shrink(grad chi + u)
        torch.sub(g, z, out=u)                      # u <- u + grad chi - z
        if weighted:
            # rfft(chi_new) is ``spec`` itself (chi_new = irfft(spec), spec Hermitian): one FFT
            # fewer per iteration than transforming chi_new again
            dchi = irfft(spec.mul_(d))
            # v = argmin 1/2 ||W (v - f)||^2 + mu/2 ||v - (D chi + s2)||^2
            torch.add(dchi, s2, out=tmp)
            v = (w2f + mu * tmp) / (w2 + mu)
            s2.add_(dchi).sub_(v)
        diff = torch.linalg.vector_norm(chi_new - chi)
        norm = torch.linalg.vector_norm(chi_new)
        chi = chi_new
        if float(diff) <= tol * float(norm):
            break
    return _finish_grid(chi, pads, box, cshape, full), iters


def _tv_parameters(lam, rho, mu, max_iter, weighted: bool) -> tuple[float, float]:
    """Defaults and checks of :func:`tv_admm`'s parameters; returns ``(lam, rho)``."""
    if lam is None:
        lam = DEFAULT_TV_LAMBDA if not weighted else DEFAULT_TV_LAMBDA_WEIGHTED
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    rho = 100.0 * lam if rho is None else float(rho)
    if rho <= 0:
        raise ValueError(f"rho must be positive (lam = 0 needs an explicit rho), got {rho}")
    if mu <= 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    return lam, rho


def _rms_normalised_weights(weights, mask, x: torch.Tensor) -> torch.Tensor:
    """Data weights broadcast onto ``x``, divided by their RMS inside the mask (per sample)."""
    wb = prepare_weights(weights, x)
    mb = None if mask is None else broadcast_mask(mask, x).to(x.dtype)
    ref = wb if mb is None else wb * mb
    cnt = (torch.ones_like(ref) if mb is None else mb).sum(dim=(-3, -2, -1), keepdim=True)
    rms = (ref.pow(2).sum(dim=(-3, -2, -1), keepdim=True) / cnt.clamp_min(1)).sqrt()
    return wb / rms.clamp_min(torch.finfo(x.dtype).tiny)


def _tv_admm_chi(f, m, vs, b0, wi, **kwargs) -> torch.Tensor:
    """:func:`_tv_admm_single` without the iteration count (for :func:`map_samples`)."""
    chi, _ = _tv_admm_single(f, m, vs, b0, wi, **kwargs)
    return chi


def tv_admm(local_field_ppm: torch.Tensor, mask: torch.Tensor | None = None,
            voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
            b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0), lam: float | None = None,
            rho: float | None = None, max_iter: int = 100, tol: float = 1e-3,
            weights: torch.Tensor | None = None, mu: float = 0.3,
            pad: PadArg = DEFAULT_INVERSION_PAD) -> torch.Tensor:
    """Total-variation dipole inversion by ADMM (Bilgic 2014).

    Solves ``min_chi 1/2 ||W (D chi - f)||^2 + lam ||grad chi||_1`` (anisotropic TV, the sum of
    absolute forward differences scaled by voxel size) with scaled ADMM, ``z = grad chi``:

    * x-update in k-space: ``(D^2 + rho |E|^2) chi = D f + rho grad^T (z - u)`` (``|E|^2`` the
      spectrum of the periodic ``grad^T grad``, as ``physics.kernels.laplacian_eigenvalues``);
    * ``z = shrink(grad chi + u, lam / rho)``; ``u <- u + grad chi - z``;
    * stop after ``max_iter`` iterations or when ``||chi_k - chi_{k-1}|| < tol ||chi_k||``.

    Without ``weights`` the data term runs over the whole padded grid with the field set to 0
    outside the mask (as in Bilgic 2014 and QSM.jl). With ``weights`` (e.g. the magnitude, or
    1 / noise std, or just the mask) the data term is ``W = mask * weights`` (normalised to RMS 1
    in the mask), so voxels outside the mask carry no data -- the true field does not vanish
    there, and dropping that false constraint is what helps most: on the head phantoms the
    weighted variant has about half the unweighted NRMSE, and binary mask weights and magnitude
    weights do alike at the same lambda (see the 'Classical dipole inversions' section of
    docs/benchmarks.md). A second split ``v = D chi`` (penalty ``mu``, dual ``s2``) keeps every
    update closed form: ``(mu D^2 + rho |E|^2) chi = mu D (v - s2) + rho grad^T (z - u)``,
    ``v = (W^2 f + mu (D chi + s2)) / (W^2 + mu)``.

    Parameters
    ----------
    local_field_ppm : (..., X, Y, Z) tensor
        Local field, ppm.
    mask : (X, Y, Z) or (B, X, Y, Z) bool tensor, optional
        Region to reconstruct (cropped to its bounding box + ``pad``).
    voxel_size_mm, b0_dir : (3,) or (B, 3)
        Voxel size (mm) and B0 direction (array axes).
    lam : float, optional
        TV weight, ppm * mm (field in ppm, gradient per mm). Default 2e-4 without weights: the
        lowest mean NRMSE of a sweep on the head phantoms, with and without field noise (QSM.rs
        uses 2e-4, QSM.jl 1e-3); 5e-5 with weights, near the best of its sweep while smaller
        values are riskier on noisier data (sweeps in the 'Classical dipole inversions' section
        of docs/benchmarks.md).
    rho : float, optional
        ADMM penalty of the ``z = grad chi`` split; default ``100 * lam`` (QSM.jl); on the head
        phantoms the result hardly depends on it over a tenfold range.
    max_iter : int
        Maximum iterations (a fixed budget, so results do not depend on wall-clock). Unweighted,
        the result has converged well within the default on the head phantoms.
    tol : float
        Relative-change tolerance ``||chi_k - chi_{k-1}|| < tol ||chi_k||``.
    weights : tensor shaped like the field (or broadcastable: (X, Y, Z), (B, X, Y), ...), optional
        Data weights (>= 0). A tensor with one more axis than the field holds per-echo weights
        (``(E, X, Y, Z)``, or ``(B, E, X, Y, Z)`` for a batch) and is combined as the root mean
        square over the echoes.
    mu : float
        Penalty of the data split (weighted variant only). Default 0.3, the best of a sweep on
        the axial head phantom with magnitude weights. The split converges slowly, so the result
        still moves with ``max_iter`` (see the 'Classical dipole inversions' section of
        docs/benchmarks.md).
    pad : int, (3,) ints, "auto" or None
        Zero padding per side around the cropped volume, voxels.

    Returns
    -------
    (..., X, Y, Z) tensor: chi in ppm, zero mean inside the mask. Computed without autograd
    (references in the module docstring).
    """
    lam, rho = _tv_parameters(lam, rho, mu, max_iter, weighted=weights is not None)
    x = local_field_ppm
    if x.ndim < 3:
        raise ValueError(f"local_field_ppm must be (..., X, Y, Z), got shape {tuple(x.shape)}")
    x = x.detach().to(float_dtype(x))
    lead = tuple(x.shape[:-3])
    vss = per_sample_vectors(voxel_size_mm, lead, "voxel_size_mm")
    b0s = per_sample_vectors(b0_dir, lead, "b0_dir")
    w = None if weights is None else _rms_normalised_weights(weights, mask, x)
    one = functools.partial(_tv_admm_chi, lam=lam, rho=rho, mu=mu, max_iter=max_iter, tol=tol,
                            pad=pad)
    with torch.no_grad():
        (chi,) = map_samples(one, x, mask, vss, b0s, extra=w)
    return reference_to_mask_mean(chi, None if mask is None else broadcast_mask(mask, chi))


def tv_brain_data(local_field_ppm: torch.Tensor, mask: torch.Tensor,
                  voxel_size_mm: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
                  b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0),
                  **params) -> torch.Tensor:
    """TV-ADMM whose data term covers the brain mask only (``tv_admm(..., weights=mask)``).

    qsmnet's ``tv`` method and the ``tv`` first estimate of the networks: the local field is
    unknown outside the mask, and dropping the false "field = 0 there" constraint of the
    whole-grid data term is what helps most (head phantoms, true local field: about half the
    whole-grid variant's NRMSE, see the 'Classical dipole inversions' section of
    docs/benchmarks.md). ``params`` go to
    :func:`tv_admm`.
    """
    return tv_admm(local_field_ppm, mask, voxel_size_mm, b0_dir,
                   weights=(mask != 0).to(local_field_ppm.dtype), **params)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

_INVERSION_KEYS = {"local_field_ppm": "local_field_ppm", "mask": "mask",
                   "voxel_size_mm": "voxel_size_mm", "b0_dir": "b0_dir"}


class TKD(Transform):
    """Transform wrapper of :func:`tkd` (dict keys: local_field_ppm, mask, voxel_size_mm,
    b0_dir -> chi_ppm)."""

    input_keys = _INVERSION_KEYS
    output_keys = ("chi_ppm",)

    def __init__(self, threshold: float = 0.15, pad: PadArg = DEFAULT_INVERSION_PAD) -> None:
        self.threshold = threshold
        self.pad = pad

    def __call__(self, local_field_ppm, mask=None, voxel_size_mm=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0)):
        return tkd(local_field_ppm, mask, voxel_size_mm, b0_dir, self.threshold, self.pad)

    def __repr__(self) -> str:
        return f"TKD(threshold={self.threshold}, pad={self.pad!r})"


class ClosedFormL2(Transform):
    """Transform wrapper of :func:`closed_form_l2` (same keys as :class:`TKD`)."""

    input_keys = _INVERSION_KEYS
    output_keys = ("chi_ppm",)

    def __init__(self, alpha: float = 0.01, pad: PadArg = DEFAULT_INVERSION_PAD) -> None:
        self.alpha = alpha
        self.pad = pad

    def __call__(self, local_field_ppm, mask=None, voxel_size_mm=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0)):
        return closed_form_l2(local_field_ppm, mask, voxel_size_mm, b0_dir, self.alpha, self.pad)

    def __repr__(self) -> str:
        return f"ClosedFormL2(alpha={self.alpha}, pad={self.pad!r})"


class TVADMM(Transform):
    """Transform wrapper of :func:`tv_admm`.

    Dict keys: local_field_ppm, mask, voxel_size_mm, b0_dir (+ ``weights_key`` when given, e.g.
    ``"magnitude"``: its ``(E, X, Y, Z)`` echoes are combined by RMS) -> chi_ppm.
    """

    output_keys = ("chi_ppm",)

    def __init__(self, lam: float | None = None, rho: float | None = None, max_iter: int = 100,
                 tol: float = 1e-3, mu: float = 0.3, pad: PadArg = DEFAULT_INVERSION_PAD,
                 weights_key: str | None = None) -> None:
        self.lam = lam
        self.rho = rho
        self.max_iter = max_iter
        self.tol = tol
        self.mu = mu
        self.pad = pad
        self.weights_key = weights_key
        self.input_keys = dict(_INVERSION_KEYS)
        if weights_key is not None:
            self.input_keys["weights"] = weights_key

    def __call__(self, local_field_ppm, mask=None, voxel_size_mm=(1.0, 1.0, 1.0),
                 b0_dir=(0.0, 0.0, 1.0), weights=None):
        return tv_admm(local_field_ppm, mask, voxel_size_mm, b0_dir, lam=self.lam, rho=self.rho,
                       max_iter=self.max_iter, tol=self.tol, weights=weights, mu=self.mu,
                       pad=self.pad)

    def __repr__(self) -> str:
        return (f"TVADMM(lam={self.lam}, rho={self.rho}, max_iter={self.max_iter}, "
                f"tol={self.tol}, weights_key={self.weights_key!r})")
