"""Grid, crop, batching and voxel-size helpers shared by the transforms (package-private).

The names here carry no leading underscore because they are used across modules of
:mod:`qsmnet.transforms`; the module itself is private (not part of the public API).

* dtypes and broadcasting: :func:`float_dtype`, :func:`as_float`, :func:`broadcast_mask`,
  :func:`broadcast_like`, :func:`prepare_weights`;
* the input check of the field-to-field transforms: :func:`checked_field`;
* per-sample geometry and batching: :func:`per_sample_vectors`, :func:`map_samples`;
* bounding boxes and crops: :func:`mask_bbox` (the one bounding-box helper), :func:`nonempty_box`,
  :func:`crop_box`, :func:`uncrop_box`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Vec3 = Sequence[float] | torch.Tensor
PadArg = int | str | Sequence[int] | None
#: One slice per spatial axis (X, Y, Z).
Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------------------------
# dtypes and broadcasting
# --------------------------------------------------------------------------------------------

def float_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if float32/float64, else converted to float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def broadcast_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a mask ``(X, Y, Z)``, ``(B, X, Y, Z)`` or ``x``-shaped onto ``x`` (bool)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    m = m.to(x.device)
    if m.shape[-3:] != x.shape[-3:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the volume "
                         f"{tuple(x.shape)} in its last three axes")
    if 4 <= m.ndim < x.ndim:
        # A per-sample mask (B, X, Y, Z) against (B, C..., X, Y, Z).
        m = m.reshape(m.shape[0], *([1] * (x.ndim - m.ndim)), *m.shape[1:])
    try:
        return torch.broadcast_to(m, x.shape)
    except RuntimeError as exc:
        raise ValueError(f"mask shape {tuple(mask.shape)} cannot be broadcast to the volume "
                         f"{tuple(x.shape)}") from exc


def broadcast_like(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast real weights ``(X, Y, Z)`` / ``(B, X, Y, Z)`` onto ``x``."""
    w = torch.as_tensor(w, device=x.device).to(float_dtype(x))
    if w.shape[-3:] != x.shape[-3:]:
        raise ValueError(f"weights shape {tuple(w.shape)} does not match the volume "
                         f"{tuple(x.shape)}")
    if 4 <= w.ndim < x.ndim:
        w = w.reshape(w.shape[0], *([1] * (x.ndim - w.ndim)), *w.shape[1:])
    return torch.broadcast_to(w, x.shape)


def prepare_weights(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Check data weights and broadcast them onto ``x``.

    A tensor with one more axis than ``x`` holds per-echo weights (e.g. magnitudes, echo axis
    -4); they are combined as the root mean square over the echoes.
    """
    w = torch.as_tensor(weights, device=x.device).detach().to(x.dtype)
    if w.ndim == x.ndim + 1:
        w = w.pow(2).mean(dim=-4).sqrt()
    if bool(torch.any(w < 0)) or not bool(torch.all(torch.isfinite(w))):
        raise ValueError("weights must be finite and non-negative")
    return broadcast_like(w, x)


def checked_field(field_ppm: torch.Tensor, mask: torch.Tensor | None,
                  name: str = "field_ppm") -> torch.Tensor:
    """The input check shared by the background-field removals and total-field inversion.

    ``field_ppm`` is ``(..., X, Y, Z)`` and ``mask`` broadcasts onto it. Values must be finite
    inside the mask; outside it they are not used, and NaN or inf there (a field map written
    with NaN outside the brain, as many tools do) is replaced by 0. Returns the field detached,
    as float32/float64.

    Raises
    ------
    ValueError
        Fewer than three axes, no mask, an empty mask, or a non-finite value inside the mask.
    """
    x = torch.as_tensor(field_ppm).detach()
    x = x.to(float_dtype(x))
    if x.ndim < 3:
        raise ValueError(f"{name} must be (..., X, Y, Z), got shape {tuple(x.shape)}")
    if mask is None:
        raise ValueError("background-field removal needs a mask")
    inside = broadcast_mask(torch.as_tensor(mask), x)
    if not bool(inside.any()):
        raise ValueError("mask is empty: there is no voxel to reconstruct")
    finite = torch.isfinite(x)
    if not bool(finite[inside].all()):
        raise ValueError(f"{name} has non-finite values inside the mask")
    return x if bool(finite.all()) else torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------------------------
# Per-sample geometry and batching
# --------------------------------------------------------------------------------------------

def per_sample_vectors(v: Vec3 | None, lead: Sequence[int], name: str) -> list[tuple | None]:
    """Expand a ``(3,)`` or ``(B, 3)`` vector to one ``(3,)`` tuple per flattened sample."""
    n = math.prod(lead)
    if v is None:
        return [None] * n
    t = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
    if t.shape[-1:] != (3,) or t.ndim > 2:
        raise ValueError(f"{name} must have shape (3,) or (B, 3), got {tuple(t.shape)}")
    if not bool(torch.all(torch.isfinite(t))):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if t.ndim == 1 or t.shape[0] == 1:
        row = tuple(float(a) for a in t.reshape(3))
        return [row] * n
    if len(lead) == 0 or lead[0] != t.shape[0]:
        raise ValueError(f"{name} has {t.shape[0]} rows but the volume has leading shape "
                         f"{tuple(lead)}; per-sample geometry needs (B, X, Y, Z) input")
    inner = math.prod(lead[1:])
    rows = [tuple(float(a) for a in r) for r in t]
    return [rows[i // inner] for i in range(n)]


def map_samples(fn: Callable, x: torch.Tensor, mask: torch.Tensor | None, *vectors,
                extra: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Run ``fn(x3, mask3, *vecs, extra3)`` on every 3-D sample and stack the results.

    ``x`` is ``(..., X, Y, Z)``; ``mask`` and ``extra`` broadcast onto it; each entry of
    ``vectors`` is a list (from :func:`per_sample_vectors`) with one item per sample. ``fn``
    returns a tuple of 3-D tensors; the stacked tuple has ``x``'s leading shape.
    """
    lead = tuple(x.shape[:-3])
    shape = tuple(x.shape[-3:])
    xs = x.reshape(-1, *shape)
    ms = None if mask is None else broadcast_mask(mask, x).reshape(-1, *shape)
    es = None if extra is None else broadcast_like(extra, x).reshape(-1, *shape)
    results = []
    for i in range(xs.shape[0]):
        res = fn(xs[i], None if ms is None else ms[i], *(v[i] for v in vectors),
                 None if es is None else es[i])
        results.append(res if isinstance(res, tuple) else (res,))
    return tuple(torch.stack([r[j] for r in results]).reshape(*lead, *shape)
                 for j in range(len(results[0])))


# --------------------------------------------------------------------------------------------
# Bounding boxes and crops
# --------------------------------------------------------------------------------------------

def mask_bbox(mask: torch.Tensor, margin: Sequence[int] | int = 0) -> Box | None:
    """Bounding box of the non-zero voxels of ``mask``, one slice per spatial axis.

    ``mask`` is ``(..., X, Y, Z)``; the box is that of the union over the leading axes. It is
    grown by ``margin`` voxels per side (an int, or one per axis) and clipped to the grid.
    Returns None for an empty mask: what that means (an error, the whole grid) is the caller's
    decision.
    """
    flat = mask.reshape(-1, *mask.shape[-3:]).any(dim=0)
    if not bool(flat.any()):
        return None
    margin = [margin] * 3 if isinstance(margin, int) else list(margin)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(flat.any(dim=other)).reshape(-1)
        lo = max(int(idx[0]) - margin[axis], 0)
        hi = min(int(idx[-1]) + 1 + margin[axis], flat.shape[axis])
        out.append(slice(lo, hi))
    return tuple(out)


def nonempty_box(mask: torch.Tensor) -> Box:
    """:func:`mask_bbox` of a mask that must not be empty (there is nothing to reconstruct)."""
    box = mask_bbox(mask)
    if box is None:
        raise ValueError("mask is empty: there is no voxel to reconstruct")
    return box


def crop_box(x: torch.Tensor, box: Box) -> torch.Tensor:
    return x[(..., *box)]


def uncrop_box(x: torch.Tensor, box: Box, shape: Sequence[int]) -> torch.Tensor:
    out = x.new_zeros(*x.shape[:-3], *shape)
    out[(..., *box)] = x
    return out
