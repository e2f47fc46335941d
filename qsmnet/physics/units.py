"""Unit conversions between phase (rad), frequency (Hz) and field (ppm).

Phase model (``docs/conventions.md``)::

    phase = phase0 + 2*pi * GAMMA_BAR * B0 * TE * field_ppm

with ``GAMMA_BAR`` in MHz/T, ``B0`` in tesla and ``TE`` in seconds: MHz * T^-1 * T * s
supplies the 1e6 that turns ppm into a phase in radians.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Proton gyromagnetic ratio over 2*pi, MHz/T (CODATA; SEPIA uses the same value).
GAMMA_BAR_MHZ_PER_T = 42.57747892

#: Longest accepted echo time, s. Gradient-echo QSM samples the phase while there is signal:
#: brain tissue T2* is about 20-70 ms at 3 T and below 100 ms at 1.5 T, so the last useful echo
#: lies well under 0.1 s (multi-echo protocols end at 30-60 ms at 3 T); at 0.2 s tissue signal
#: has decayed to exp(-200/70) < 6 %. A larger number is a unit slip (ms, or a 10x typo).
TE_MAX_S = 0.2

Number = float | int
TeLike = Number | Sequence[Number] | torch.Tensor


def echo_time_problem(te_s: Sequence[float], max_s: float = TE_MAX_S) -> str | None:
    """What is wrong with a series of echo times in seconds, or None when nothing is.

    The one rule set for echo times (readers and transforms phrase its answer for their
    callers): every TE finite and positive, at most ``max_s`` (values of 1 and above are
    reported as milliseconds), strictly increasing.

    Parameters
    ----------
    te_s : sequence of float
        Echo times, s, in acquisition order.
    max_s : float
        Longest accepted echo time (:data:`TE_MAX_S`; larger where TE is only a placeholder).
    """
    values = [float(t) for t in te_s]
    if not values:
        return "no EchoTime given"
    for t in values:
        if not math.isfinite(t) or t <= 0:
            return f"EchoTime {t!r} must be positive (seconds)"
        if t > max_s:
            if t >= 1.0:
                return f"EchoTime {t:g} looks like milliseconds; BIDS EchoTime is in seconds"
            return (f"EchoTime {t:g} s is longer than {max_s:g} s, past any gradient-echo QSM "
                    "echo (tissue T2* is under 0.1 s); BIDS EchoTime is in seconds (0.02 for "
                    "20 ms)")
    if any(b <= a for a, b in zip(values, values[1:])):
        return f"echo times {values} must be strictly increasing"
    return None


def _te_tensor(te_s: TeLike, like: torch.Tensor) -> torch.Tensor | float:
    """Echo times as something that broadcasts against ``like``.

    A scalar stays a scalar. A 1-D sequence of E echo times is reshaped to ``(E, 1, 1, 1)`` so
    that it lines up with a multi-echo volume ``(..., E, X, Y, Z)``.
    """
    if isinstance(te_s, (int, float)):
        return float(te_s)
    te = torch.as_tensor(te_s, dtype=like.dtype if like.is_floating_point() else torch.float32,
                         device=like.device)
    if te.ndim == 1 and like.ndim >= 4:
        te = te.reshape(-1, 1, 1, 1)
    return te


def _check_positive(name: str, value: TeLike) -> None:
    t = torch.as_tensor(value, dtype=torch.float64)
    if not bool(torch.all(torch.isfinite(t))) or bool(torch.any(t <= 0)):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def phase_to_ppm(phase_rad: torch.Tensor, te_s: TeLike, b0_t: Number,
                 phase_sign: int = 1) -> torch.Tensor:
    """Convert (unwrapped) phase in radians to field in ppm.

    Parameters
    ----------
    phase_rad : (..., X, Y, Z) or (..., E, X, Y, Z) tensor
        Phase in radians. With a 1-D ``te_s`` of E echo times, the echo axis is dim -4.
    te_s : float or sequence of float
        Echo time(s) in seconds.
    b0_t : float
        Field strength in tesla.
    phase_sign : {+1, -1}
        Vendor phase polarity: +1 means phase grows with positive field.

    Returns
    -------
    Tensor, same shape as ``phase_rad``: field in ppm.
    """
    _check_positive("te_s", te_s)
    _check_positive("b0_t", b0_t)
    te = _te_tensor(te_s, phase_rad)
    return phase_sign * phase_rad / (2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * b0_t * te)


def ppm_to_phase(field_ppm: torch.Tensor, te_s: TeLike, b0_t: Number,
                 phase_sign: int = 1) -> torch.Tensor:
    """Inverse of :func:`phase_to_ppm`: phase in radians accrued at ``te_s`` (not wrapped)."""
    _check_positive("te_s", te_s)
    _check_positive("b0_t", b0_t)
    te = _te_tensor(te_s, field_ppm)
    return phase_sign * field_ppm * (2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * b0_t * te)


def hz_to_ppm(field_hz: torch.Tensor, b0_t: Number) -> torch.Tensor:
    """Frequency offset in Hz to field in ppm (Hz / (GAMMA_BAR[MHz/T] * B0[T]))."""
    _check_positive("b0_t", b0_t)
    return field_hz / (GAMMA_BAR_MHZ_PER_T * b0_t)


def ppm_to_hz(field_ppm: torch.Tensor, b0_t: Number) -> torch.Tensor:
    """Field in ppm to frequency offset in Hz."""
    _check_positive("b0_t", b0_t)
    return field_ppm * (GAMMA_BAR_MHZ_PER_T * b0_t)


def wrap_phase(phase_rad: torch.Tensor) -> torch.Tensor:
    """Wrap phase to [-pi, pi)."""
    return torch.remainder(phase_rad + math.pi, 2.0 * math.pi) - math.pi
