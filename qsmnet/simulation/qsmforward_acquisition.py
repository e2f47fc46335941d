"""Multi-echo GRE acquisition of a phantom simulated with ``qsm-forward`` (independent simulator).

Used to build evaluation sets and test fixtures that do not share code with the training
simulator: the forward field, shim, phase offset, signal model and noise all come from the
``qsm-forward`` package (a dev dependency). Note its conventions: kernel ``D(0) = 1/3`` with the
mean field in the mask removed, padding with the corner value to twice the grid, and
``GAMMA_BAR = 42.58`` MHz/T in the signal phase (0.006 % from qsmnet's constant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qsmnet.physics.geometry import affine_from_b0_dir, normalize_b0_dir
from qsmnet.simulation.head_phantom import HeadPhantom, head_phantom

QSMFORWARD_GAMMA_BAR_MHZ_PER_T = 42.58


def _qsm_forward():
    try:
        import qsm_forward
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("this needs the `qsm-forward` package: pip install -e '.[dev]'") from exc
    return qsm_forward


@dataclass
class Acquisition:
    """A simulated acquisition and its truths.

    Attributes
    ----------
    phase : (E, X, Y, Z) float32, wrapped phase in rad.
    magnitude : (E, X, Y, Z) float32.
    te_s : (E,) echo times, s.
    b0_t : field strength, T.
    b0_dir : (3,) B0 direction in array axes.
    voxel_size_mm : (3,)
    affine : (4, 4) affine encoding ``b0_dir`` (scanner z is B0).
    mask : (X, Y, Z) bool brain mask.
    chi_ppm : (X, Y, Z) float64 truth inside the mask, referenced to its mean there, 0 outside.
    local_field_ppm : (X, Y, Z) field of ``chi_ppm`` (qsm-forward), mean 0 in the mask, masked.
    total_field_ppm : (X, Y, Z) total field after the simulated shim (what the phase encodes), not
        masked; mean 0 in the mask.
    phase_offset_rad : (X, Y, Z) the echo-independent phase phi0.
    seg : (X, Y, Z) tissue labels.
    """

    phase: np.ndarray
    magnitude: np.ndarray
    te_s: tuple[float, ...]
    b0_t: float
    b0_dir: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    affine: np.ndarray
    mask: np.ndarray
    chi_ppm: np.ndarray
    local_field_ppm: np.ndarray
    total_field_ppm: np.ndarray
    phase_offset_rad: np.ndarray
    seg: np.ndarray


def supersample_factors(voxel_size_mm: Sequence[float], fine_voxel_mm: float) -> tuple[int, ...]:
    """Integer split per axis that makes every sub-voxel at most ``fine_voxel_mm`` (mm) wide."""
    if fine_voxel_mm <= 0:
        raise ValueError(f"fine_voxel_mm must be > 0, got {fine_voxel_mm}")
    return tuple(max(1, int(np.ceil(float(v) / fine_voxel_mm - 1e-9))) for v in voxel_size_mm)


def voxel_averaged_field(chi_ppm: np.ndarray, voxel_size_mm: Sequence[float],
                         b0_dir: Sequence[float], factors: Sequence[int] | int = 1) -> np.ndarray:
    """qsm-forward's field of ``chi_ppm`` (X, Y, Z, ppm), averaged over each voxel.

    Every voxel is split into ``factors`` sub-voxels per axis carrying its susceptibility, the
    field is computed by ``qsm_forward.generate_field`` on that finer grid and averaged back to
    the voxel (what a voxel's signal sees, to first order). ``factors = 1`` is plain
    ``generate_field``.

    Why: with the field computed on the voxel grid itself, the sampled k-space kernel turns a
    sharp, strong step (air at about +9 ppm against tissue) into oscillating, non-harmonic field
    next to it. For B0 oblique to the grid this reaches well inside the brain: on the head
    phantom tilted 25 deg, the background field alone leaves an RMS of 0.019 ppm after V-SHARP
    and 0.016 ppm after RESHARP (binary spheres) (twice the local field's RMS), against 0.0002 and 0.0001 ppm
    with ``factors = 2``; a physical background field is harmonic in the brain and leaves
    nothing. Memory: qsm-forward pads to twice the grid in float64, so ``factors = 2`` on a
    136 x 160 x 136 head peaks at about 13 GB.
    """
    qf = _qsm_forward()
    f = (int(factors),) * 3 if np.isscalar(factors) else tuple(int(k) for k in factors)
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"factors must be one or three positive integers, got {factors!r}")
    if f == (1, 1, 1):
        return qf.generate_field(chi_ppm, voxel_size=list(voxel_size_mm), B0_dir=list(b0_dir))
    fine = chi_ppm
    for axis, k in enumerate(f):
        fine = np.repeat(fine, k, axis=axis)
    field = qf.generate_field(fine, voxel_size=[v / k for v, k in zip(voxel_size_mm, f)],
                              B0_dir=list(b0_dir))
    del fine
    x, y, z = chi_ppm.shape
    return field.reshape(x, f[0], y, f[1], z, f[2]).mean(axis=(1, 3, 5))


def simulate_acquisition(phantom: HeadPhantom, b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
                         b0_t: float = 3.0, te_s: Sequence[float] = (0.004, 0.012, 0.020, 0.028),
                         tr_s: float = 0.05, flip_angle_deg: float = 15.0,
                         peak_snr: float = 100.0, shim: bool = True, phase_offset: bool = True,
                         seed: int = 0,
                         background_supersample: Sequence[int] | int = 1) -> Acquisition:
    """Simulate a multi-echo GRE acquisition of ``phantom`` with qsm-forward.

    Parameters
    ----------
    phantom : HeadPhantom
    b0_dir : (3,) B0 direction in array axes (normalised here).
    b0_t : field strength, T.
    te_s : echo times, s.
    peak_snr : peak SNR of the complex noise (``inf`` for none).
    shim : remove a 2nd-order solid-harmonic fit of the field in the brain (an ideal shim, see
        :func:`harmonic_shim_residual`).
    phase_offset : add qsm-forward's smooth quadratic phase offset phi0.
    seed : noise seed.
    background_supersample : sub-voxels per axis (one int or three) for the field of the
        sources outside the brain (air, bone, scalp) and of the brain's mean susceptibility;
        see :func:`voxel_averaged_field`. The local field (the brain's own sources, the truth
        of the dipole stage) is always qsm-forward's field on the voxel grid. The total field is
        their sum, so ``1`` reproduces ``generate_field`` of the whole head.
    """
    qf = _qsm_forward()
    b0 = normalize_b0_dir(b0_dir)
    vs = list(phantom.voxel_size_mm)
    mask = phantom.brain_mask
    chi = phantom.chi_brain_ppm
    local_unmasked = qf.generate_field(chi, mask=mask, voxel_size=vs, B0_dir=list(b0))
    background = voxel_averaged_field(phantom.chi_ppm - chi, vs, b0, background_supersample)
    total = local_unmasked + background
    total -= total[mask].mean()
    if shim:
        total = harmonic_shim_residual(total, mask, vs)
    local = local_unmasked * mask
    phi0 = (qf.generate_phase_offset(phantom.m0, mask, phantom.chi_ppm.shape)
            if phase_offset else np.zeros(phantom.chi_ppm.shape))
    rng = np.random.default_rng(seed)
    phases, mags = [], []
    for te in te_s:
        sig = qf.generate_signal(total, B0=b0_t, TR=tr_s, TE=te, flip_angle=flip_angle_deg,
                                 phase_offset=phi0, R1=1.0, R2star=phantom.r2star_hz, M0=phantom.m0)
        if np.isfinite(peak_snr):
            sig = qf.add_noise(sig, peak_snr=peak_snr, rng=rng)
        phases.append(np.angle(sig).astype(np.float32))
        mags.append(np.abs(sig).astype(np.float32))
    affine = affine_from_b0_dir(b0, vs, phantom.chi_ppm.shape)
    return Acquisition(phase=np.stack(phases), magnitude=np.stack(mags),
                       te_s=tuple(float(t) for t in te_s), b0_t=float(b0_t), b0_dir=b0,
                       voxel_size_mm=tuple(vs), affine=affine, mask=mask.copy(), chi_ppm=chi,
                       local_field_ppm=local, total_field_ppm=total, phase_offset_rad=phi0,
                       seg=phantom.seg)


def harmonic_shim_residual(field_ppm: np.ndarray, mask: np.ndarray,
                           voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Field left after an ideal 2nd-order shim: the least-squares fit inside ``mask`` of the
    solid spherical harmonics up to order 2 (1, x, y, z, xy, xz, yz, x^2 - y^2, 2z^2 - x^2 - y^2,
    in mm) is subtracted, and the result has zero mean in the mask.

    Shim coils produce harmonic fields, so a shim never adds a non-harmonic component inside the
    brain. (qsm-forward's ``generate_shimmed_field`` fits in voxel-index coordinates, whose
    ``2z^2 - x^2 - y^2`` is not harmonic on anisotropic grids, which no background removal could
    then remove; hence this fit in mm.)
    """
    axes = [(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(field_ppm.shape, voxel_size_mm)]
    x, y, z = (a[mask.nonzero()[i]] / 100.0 for i, a in enumerate(axes))
    basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                      2 * z * z - x * x - y * y], axis=1)
    coef, *_ = np.linalg.lstsq(basis, field_ppm[mask], rcond=None)
    X, Y, Z = np.meshgrid(*[a / 100.0 for a in axes], indexing="ij", sparse=True)
    fit = (coef[0] + coef[1] * X + coef[2] * Y + coef[3] * Z + coef[4] * X * Y + coef[5] * X * Z
           + coef[6] * Y * Z + coef[7] * (X * X - Y * Y) + coef[8] * (2 * Z * Z - X * X - Y * Y))
    out = field_ppm - fit
    return out - out[mask].mean()


def tilted_b0(tilt_deg: float, azimuth_deg: float = 30.0) -> np.ndarray:
    """Unit B0 vector tilted ``tilt_deg`` from array z, at ``azimuth_deg`` in the xy plane."""
    t, a = np.radians(tilt_deg), np.radians(azimuth_deg)
    return np.array([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), np.cos(t)])


#: The fixed evaluation cases: (name, voxel size mm, B0 tilt deg). Reported in docs/benchmarks.md.
EVALUATION_CASES = (
    ("axial_1mm", (1.0, 1.0, 1.0), 0.0),
    ("tilt25_1mm", (1.0, 1.0, 1.0), 25.0),
    ("axial_1x1x2mm", (1.0, 1.0, 2.0), 0.0),
)


#: Sub-voxel size (mm) for the evaluation set's background field (:func:`voxel_averaged_field`).
EVALUATION_FINE_VOXEL_MM = 0.5

#: Tag for cached copies of the evaluation set: changes whenever the simulation recipe does.
EVALUATION_SET_TAG = f"bg{EVALUATION_FINE_VOXEL_MM}mm"


def evaluation_set(seeds: Sequence[int] = (0, 1), scale: float = 0.75, peak_snr: float = 100.0,
                   cases=EVALUATION_CASES, **kwargs) -> list[tuple[str, Acquisition]]:
    """The fixed set of head-like qsm-forward phantoms used for reported accuracy figures.

    Each seed is a distinct subject; each case applies a voxel size and B0 tilt to it.
    ``scale`` < 1 shrinks the head (and grid) to keep CPU benchmarks quick. The background
    field is computed on sub-voxels of at most ``EVALUATION_FINE_VOXEL_MM`` (see
    :func:`voxel_averaged_field`); pass ``background_supersample`` to override.
    """
    out = []
    for seed in seeds:
        for name, vs, tilt in cases:
            ph = head_phantom(voxel_size_mm=vs, seed=seed, scale=scale)
            opts = {"background_supersample": supersample_factors(vs, EVALUATION_FINE_VOXEL_MM),
                    **kwargs}
            acq = simulate_acquisition(ph, b0_dir=tilted_b0(tilt), peak_snr=peak_snr,
                                       seed=1000 + seed, **opts)
            out.append((f"{name}_s{seed}", acq))
    return out


@dataclass(frozen=True)
class EndToEndCase:
    """One acquisition setting of the end-to-end evaluation set.

    ``r2star`` of the phantom (given at 3 T) is scaled by ``b0_t / 3``: R2* grows about linearly
    with the field strength (Peters et al. 2007).
    """

    name: str
    voxel_size_mm: tuple[float, float, float]
    tilt_deg: float
    b0_t: float
    te_s: tuple[float, ...]
    peak_snr: float


_TE_3T_S = (0.004, 0.012, 0.020, 0.028)
_TE_7T_S = (0.004, 0.009, 0.014, 0.019)  # shorter spacing: T2* is about half that at 3 T

#: The end-to-end evaluation cases (from wrapped phase): 3 T and 7 T, axial and oblique B0 (15-45
#: deg), 1 mm and 1x1x2 mm, peak SNR 50-100; the head phantom's sphenoid sinus lies a few mm
#: under the brain. Reported in docs/benchmarks.md ("Per-stage error attribution").
END_TO_END_CASES = (
    EndToEndCase("3t_axial_1mm", (1.0, 1.0, 1.0), 0.0, 3.0, _TE_3T_S, 100.0),
    EndToEndCase("3t_tilt30_1mm", (1.0, 1.0, 1.0), 30.0, 3.0, _TE_3T_S, 80.0),
    EndToEndCase("3t_tilt15_1x1x2mm", (1.0, 1.0, 2.0), 15.0, 3.0, _TE_3T_S, 100.0),
    EndToEndCase("7t_axial_1mm", (1.0, 1.0, 1.0), 0.0, 7.0, _TE_7T_S, 80.0),
    EndToEndCase("7t_tilt45_1x1x2mm", (1.0, 1.0, 2.0), 45.0, 7.0, _TE_7T_S, 50.0),
)

#: Subjects (phantom seeds) of the end-to-end set: disjoint from the dipole-stage set (0, 1), on
#: which the reconstruction defaults (field margin, unreliable-phase step, PDF settings) were
#: chosen.
END_TO_END_SEEDS = (11, 12)
#: Subjects of the anatomical phantom in the end-to-end set (its own seeds: rotation, size,
#: values, veins and lesions), disjoint from any seed used to train or tune.
ANATOMICAL_SEEDS = (31, 32)
#: Phantoms of the end-to-end set: the head-like phantom and the anatomical one
#: (:func:`qsmnet.simulation.anatomical_phantom.anatomical_phantom`); names of the latter's
#: acquisitions start with ``anat_``.
PHANTOMS = ("head", "anatomical")


def _phantom(kind: str, voxel_size_mm, seed: int, scale: float) -> HeadPhantom:
    if kind == "head":
        return head_phantom(voxel_size_mm=voxel_size_mm, seed=seed, scale=scale)
    if kind == "anatomical":
        from qsmnet.simulation.anatomical_phantom import anatomical_phantom

        return anatomical_phantom(voxel_size_mm=voxel_size_mm, seed=seed, scale=scale)
    raise ValueError(f"phantom must be one of {PHANTOMS}, got {kind!r}")


def end_to_end_set(seeds: Sequence[int] = END_TO_END_SEEDS, scale: float = 0.75,
                   cases: Sequence[EndToEndCase] = END_TO_END_CASES, phantom: str = "head"
                   ) -> list[tuple[str, Acquisition]]:
    """The end-to-end evaluation set: each seed a subject, each case an acquisition of it.

    The background field is computed on sub-voxels of at most ``EVALUATION_FINE_VOXEL_MM``, as
    for :func:`evaluation_set`; noise seeds are ``2000 + seed``. ``phantom`` is one of
    :data:`PHANTOMS` (the same seed gives a different subject in each).
    """
    import dataclasses

    prefix = "" if phantom == "head" else "anat_"
    out = []
    for seed in seeds:
        for case in cases:
            ph = _phantom(phantom, case.voxel_size_mm, seed, scale)
            ph = dataclasses.replace(ph, r2star_hz=ph.r2star_hz * (case.b0_t / 3.0))
            acq = simulate_acquisition(
                ph, b0_dir=tilted_b0(case.tilt_deg), b0_t=case.b0_t, te_s=case.te_s,
                peak_snr=case.peak_snr, seed=2000 + seed,
                background_supersample=supersample_factors(case.voxel_size_mm,
                                                           EVALUATION_FINE_VOXEL_MM))
            out.append((f"{prefix}{case.name}_s{seed}", acq))
    return out
