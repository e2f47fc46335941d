"""The forward model: field (ppm) of a susceptibility distribution chi (ppm).

``field = crop(ifftn(D * fftn(pad(chi))))``, with zero padding against wrap-around of the
dipole tails. The operator is real, linear and self-adjoint (pad and crop are each other's
adjoints and D is real and even), which the data-consistency loss relies on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import scipy.fft
import torch
import torch.nn.functional as F

from qsmnet.physics.kernels import dipole_kernel

PadSpec = str | int | Sequence[int] | None


def pad_amount(shape: Sequence[int], pad: PadSpec = "auto") -> list[tuple[int, int]]:
    """Per-axis ``(before, after)`` zero padding for a convolution grid.

    Parameters
    ----------
    shape : (X, Y, Z)
    pad : "auto", int, (3,) ints, or None/0
        ``"auto"`` pads each axis by about half its size on each side (a grid about twice the
        volume, enough that dipole tails do not wrap); an int or triple gives the minimum number
        of voxels per side. The padded size is rounded up to an FFT-friendly (5-smooth) length.
        ``None`` or ``0`` means circular convolution on the original grid.
    """
    if pad is None or (isinstance(pad, int) and pad == 0):
        return [(0, 0)] * 3
    if isinstance(pad, str):
        if pad != "auto":
            raise ValueError(f"pad must be 'auto', an int, a triple or None, got {pad!r}")
        per_side = [int(math.ceil(n / 2)) for n in shape]
    elif isinstance(pad, int):
        per_side = [pad] * 3
    else:
        per_side = [int(p) for p in pad]
    if any(p < 0 for p in per_side):
        raise ValueError(f"padding must be non-negative, got {pad!r}")
    out = []
    for n, p in zip(shape, per_side):
        total = scipy.fft.next_fast_len(int(n) + 2 * p, real=True) - int(n)
        out.append((total // 2, total - total // 2))
    return out


def _pad(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    if all(p == (0, 0) for p in pads):
        return x
    # F.pad lists the last axis first.
    flat = [pads[2][0], pads[2][1], pads[1][0], pads[1][1], pads[0][0], pads[0][1]]
    return F.pad(x, flat)


def _crop(x: torch.Tensor, pads: list[tuple[int, int]], shape: Sequence[int]) -> torch.Tensor:
    (a, _), (b, _), (c, _) = pads
    return x[..., a:a + shape[0], b:b + shape[1], c:c + shape[2]]


def _apply_kernel(x: torch.Tensor, kernel_half: torch.Tensor) -> torch.Tensor:
    spatial = x.shape[-3:]
    k = kernel_half
    if k.ndim == 4 and x.ndim > 4:
        # Per-sample kernel (B, X, Y, Z') against x (B, C..., X, Y, Z).
        k = k.reshape(k.shape[0], *([1] * (x.ndim - 4)), *k.shape[1:])
    spec = torch.fft.rfftn(x, dim=(-3, -2, -1))
    return torch.fft.irfftn(spec * k, s=spatial, dim=(-3, -2, -1))


def forward_field(chi: torch.Tensor, voxel_size: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
                  b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0),
                  pad: PadSpec = "auto") -> torch.Tensor:
    """Field (ppm) produced by susceptibility ``chi`` (ppm).

    Parameters
    ----------
    chi : (..., X, Y, Z) real tensor
        Susceptibility in ppm. float32 or float64; any device.
    voxel_size : (3,) or (B, 3)
        Voxel size in mm along the array axes (``(B, 3)``: one per sample, chi ``(B, ..., X, Y, Z)``).
    b0_dir : (3,) or (B, 3)
        B0 direction in array-axis coordinates (need not be normalised).
    pad : see :func:`pad_amount`
        Zero padding against wrap-around (default about 2x the grid).

    Returns
    -------
    Tensor, same shape, dtype and device as ``chi``: the field in ppm, with ``D(0) = 0``.

    Examples
    --------
    >>> import torch
    >>> chi = torch.zeros(16, 16, 16); chi[8, 8, 8] = 1.0
    >>> forward_field(chi, voxel_size=(1, 1, 1), b0_dir=(0, 0, 1)).shape
    torch.Size([16, 16, 16])
    """
    if chi.ndim < 3:
        raise ValueError(f"chi must be at least 3-D (..., X, Y, Z), got shape {tuple(chi.shape)}")
    dtype = chi.dtype if chi.dtype in (torch.float32, torch.float64) else torch.float32
    key = pad if isinstance(pad, (str, int, type(None))) else tuple(int(p) for p in pad)
    layer = _SHARED_LAYERS.get(key)
    if layer is None:
        layer = _SHARED_LAYERS.setdefault(key, DipoleConvolution(key, cache_size=4))
    return layer(chi.to(dtype), voxel_size, b0_dir)


def voxel_averaged_field(chi: torch.Tensor,
                         voxel_size: Sequence[float] | torch.Tensor = (1.0, 1.0, 1.0),
                         b0_dir: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0),
                         factors: int | Sequence[int] = 2, pad: PadSpec = "auto") -> torch.Tensor:
    """Field (ppm) of ``chi`` (ppm) averaged over each voxel, computed on sub-voxels.

    Each voxel is split into ``factors`` sub-voxels per axis that carry its susceptibility, the
    field is computed by :func:`forward_field` on that finer grid (voxel size ``voxel_size /
    factors``) and averaged back over each voxel. ``factors = 1`` is :func:`forward_field`.

    Use it for strong, sharp sources *outside* the region where the field is used (air at about
    +9 ppm, bone): computed on the voxel grid itself, the sampled k-space kernel turns such a
    step into a field that oscillates near it and, for B0 oblique to the grid, is not harmonic
    well away from it. Averaging over sub-voxels brings the field close to the exact dipole
    field of the source; even factors do best, and 2 is enough (figures: "The background field
    on sub-voxels" in the notes of ``docs/benchmarks.md``). Inside a source region keep
    :func:`forward_field`: the local field a network is trained to invert is defined with the
    voxel-grid kernel, as in the data-consistency loss.

    Parameters
    ----------
    chi : (..., X, Y, Z) real tensor
        Susceptibility, ppm.
    voxel_size : (3,) or (B, 3)
        Voxel size, mm.
    b0_dir : (3,) or (B, 3)
        B0 direction in array-axis coordinates.
    factors : int or (3,) ints
        Sub-voxels per axis (>= 1).
    pad : see :func:`pad_amount`
        Zero padding in *voxels of the input grid* (scaled by ``factors`` on the fine grid).

    Returns
    -------
    Tensor, same shape, dtype and device as ``chi``. Memory and time grow with
    ``prod(factors)`` (8x for 2).
    """
    f = (int(factors),) * 3 if isinstance(factors, int) else tuple(int(k) for k in factors)
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"factors must be one or three integers >= 1, got {factors!r}")
    if f == (1, 1, 1):
        return forward_field(chi, voxel_size, b0_dir, pad=pad)
    if chi.ndim < 3:
        raise ValueError(f"chi must be at least 3-D (..., X, Y, Z), got shape {tuple(chi.shape)}")
    fine = chi
    for axis, k in zip((-3, -2, -1), f):
        fine = fine.repeat_interleave(k, dim=axis)
    if isinstance(pad, int) and not isinstance(pad, bool):
        fine_pad: PadSpec = tuple(pad * k for k in f)
    elif pad is None or isinstance(pad, str):
        fine_pad = pad
    else:
        fine_pad = tuple(int(p) * k for p, k in zip(pad, f))
    vs = torch.as_tensor(voxel_size, dtype=torch.float64) / torch.tensor(f, dtype=torch.float64)
    field = forward_field(fine, vs, b0_dir, pad=fine_pad)
    del fine
    x, y, z = chi.shape[-3:]
    lead = tuple(chi.shape[:-3])
    return field.reshape(*lead, x, f[0], y, f[1], z, f[2]).mean(dim=(-5, -3, -1))


class DipoleConvolution(torch.nn.Module):
    """The forward dipole layer: differentiable ``chi -> field`` with cached kernels.

    Used for the data-consistency loss and for test-time refinement. The kernel for each
    (padded shape, voxel size, B0 direction, dtype, device) is cached (LRU, ``cache_size``).
    With per-sample geometry pass ``voxel_size`` and ``b0_dir`` as ``(B, 3)`` tensors.

    The operator is self-adjoint, so ``adjoint`` is the same call.
    """

    def __init__(self, pad: PadSpec = "auto", cache_size: int = 32) -> None:
        super().__init__()
        self.pad = pad
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def kernel(self, padded_shape: Sequence[int], voxel_size, b0_dir, dtype, device) -> torch.Tensor:
        vs = torch.as_tensor(voxel_size, dtype=torch.float64).detach().cpu()
        bd = torch.as_tensor(b0_dir, dtype=torch.float64).detach().cpu()
        key = (tuple(padded_shape), tuple(vs.reshape(-1).tolist()), tuple(bd.reshape(-1).tolist()),
               tuple(vs.shape), tuple(bd.shape), dtype, str(device))
        k = self._cache.get(key)
        if k is None:
            k = dipole_kernel(padded_shape, vs, bd, half=True, dtype=dtype, device=device)
            self._cache[key] = k
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return k

    def forward(self, chi: torch.Tensor, voxel_size=(1.0, 1.0, 1.0),
                b0_dir=(0.0, 0.0, 1.0)) -> torch.Tensor:
        shape = tuple(chi.shape[-3:])
        pads = pad_amount(shape, self.pad)
        padded_shape = [n + a + b for n, (a, b) in zip(shape, pads)]
        k = self.kernel(padded_shape, voxel_size, b0_dir, chi.dtype, chi.device)
        return _crop(_apply_kernel(_pad(chi, pads), k), pads, shape)

    adjoint = forward


# forward_field reuses kernels across calls with the same geometry (small caches: kernels of
# large padded grids take hundreds of MB).
_SHARED_LAYERS: dict = {}
