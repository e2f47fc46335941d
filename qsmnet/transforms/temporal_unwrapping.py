"""Temporal unwrapping of multi-echo phase against a spatially unwrapped reference echo.

:func:`temporal_unwrap` / :class:`TemporalUnwrap`: every other echo is unwrapped against a
prediction from the spatially unwrapped reference echo,
``phase_e - 2 pi round((phase_e - pred_e) / 2 pi)``, with ``pred_e = phase_ref TE_e / TE_ref``
(``progressive=False``, ROMEO's rule) or, by default, ``pred_e = slope TE_e`` from the
weighted fit of the echoes unwrapped so far (walking outwards from the reference), which
averages the reference's noise down before it is multiplied by ``TE_e / TE_ref``.

The phase is expected with its offset removed (:mod:`qsmnet.transforms.phase_offsets`), so that
it is proportional to TE. Shapes: ``(..., E, X, Y, Z)`` (echo axis -4); ``te_s`` ``(E,)`` or
``(B, E)`` in seconds.
"""

from __future__ import annotations

import math

import torch

from qsmnet.transforms._echoes import check_te_s, echo, echo_weights, te_view
from qsmnet.transforms._grid import as_float
from qsmnet.transforms.base import OptionalKeysTransform

__all__ = ["TemporalUnwrap", "temporal_unwrap"]

TWO_PI = 2.0 * math.pi


def temporal_unwrap(phase_rad: torch.Tensor, te_s, reference_rad: torch.Tensor,
                    ref_index: int = 0, magnitude: torch.Tensor | None = None,
                    progressive: bool = True, weighting: str = "magnitude2") -> torch.Tensor:
    """Unwrap echoes in time against a spatially unwrapped reference echo.

    Parameters
    ----------
    phase_rad : (..., E, X, Y, Z)
        Wrapped phase (offset removed, so that phase is proportional to TE), rad.
    te_s : (E,) or (B, E)
        Echo times, s.
    reference_rad : (..., X, Y, Z)
        The unwrapped phase of echo ``ref_index``.
    ref_index : int
        Reference echo.
    magnitude : (..., E, X, Y, Z), optional
        Weights for the running fit (``progressive``).
    progressive : bool
        Predict echo e from the weighted fit (through the origin) of all echoes unwrapped so
        far, walking outwards from the reference in order of ``|TE_e - TE_ref|``. Otherwise
        ``pred_e = reference TE_e / TE_ref``.

    Returns
    -------
    (..., E, X, Y, Z): ``phase_e - 2 pi round((phase_e - pred_e) / 2 pi)``; echo ``ref_index``
    is ``reference_rad``.
    """
    phase_rad = as_float(phase_rad)
    n_echo = phase_rad.shape[-4]
    te = check_te_s(te_s, n_echo)
    te_v = te_view(te, phase_rad)
    ref = reference_rad.to(phase_rad.dtype)
    w_all = echo_weights(magnitude, phase_rad, weighting)
    te_ref = echo(te_v, ref_index) if te.ndim == 2 else float(te[ref_index])
    out = [None] * n_echo
    out[ref_index] = ref
    te0 = te if te.ndim == 1 else te[0]
    order = sorted(range(n_echo), key=lambda e: abs(float(te0[e]) - float(te0[ref_index])))
    te_c = lambda e: echo(te_v, e)  # noqa: E731 - (..., 1, 1, 1) or float-like tensor
    num = echo(w_all, ref_index) * te_c(ref_index) * ref
    den = echo(w_all, ref_index) * te_c(ref_index) ** 2
    for e in order:
        if e == ref_index:
            continue
        if progressive:
            slope = num / den.clamp_min(torch.finfo(den.dtype).tiny)
            # Where all weights so far vanish, fall back to the reference's slope.
            slope = torch.where(den > 0, slope, ref / te_ref)
            pred = slope * te_c(e)
        else:
            pred = ref * (te_c(e) / te_ref)
        pe = echo(phase_rad, e)
        ue = pe - TWO_PI * torch.round((pe - pred) / TWO_PI)
        out[e] = ue
        we = echo(w_all, e)
        num = num + we * te_c(e) * ue
        den = den + we * te_c(e) ** 2
    return torch.stack(out, dim=-4)


class TemporalUnwrap(OptionalKeysTransform):
    """Temporal unwrapping against a spatially unwrapped reference echo (see
    :func:`temporal_unwrap`).

    Call
    ----
    ``(phase_rad (..., E, X, Y, Z), te_s, reference_rad (..., X, Y, Z), magnitude=None)`` ->
    unwrapped phase (..., E, X, Y, Z). Sample dict: ``phase, te_s, phase_ref_unwrapped``,
    ``magnitude`` (optional) -> ``phase``.
    """

    input_keys = {"phase_rad": "phase", "te_s": "te_s", "reference_rad": "phase_ref_unwrapped"}
    optional_input_keys = {"magnitude": "magnitude"}
    output_keys = ("phase",)

    def __init__(self, ref_index: int = 0, progressive: bool = True,
                 weighting: str = "magnitude2") -> None:
        echo_weights(None, torch.zeros(1), weighting)
        self.ref_index = int(ref_index)
        self.progressive = bool(progressive)
        self.weighting = weighting

    def __call__(self, phase_rad: torch.Tensor, te_s, reference_rad: torch.Tensor,
                 magnitude: torch.Tensor | None = None) -> torch.Tensor:
        return temporal_unwrap(phase_rad, te_s, reference_rad, self.ref_index, magnitude,
                               self.progressive, self.weighting)
