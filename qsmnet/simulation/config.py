"""Configuration of the training-data simulator: every range in one flat, Hydra-friendly dataclass.

All lengths are in millimetres, susceptibilities and fields in ppm, times in seconds, B0 in tesla.
A "range" is a ``(low, high)`` pair sampled uniformly (``*_log`` ranges log-uniformly); a range
with ``low == high`` fixes the value. Fixed geometry (``voxel_size_mm``, ``b0_dir``) and fixed
echo times (``te_s``) override the random draws when they are not ``None``.

``SimulationConfig(**mapping)`` accepts plain dicts and OmegaConf nodes (lists become tuples), so
``configs/data/*.yaml`` can override any field: ``data.simulator.max_tilt_deg=30``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Fewest voxels per axis of a simulated subject (``qsmnet simulate``): the head phantom's
#: skull, CSF and brain need this room (a volume predict accepts, ``MIN_EXTENT_VOXELS``, may be
#: thinner)
MIN_SIMULATED_VOXELS = 16

Range = tuple[float, float]


@dataclass
class SimulationConfig:
    """Ranges of the random training-sample simulator (:class:`qsmnet.simulation.QSMSimulator`).

    Geometry
    --------
    voxel_size_mm : fixed voxel size (3 floats), or None to draw one per sample.
    voxel_size_range_mm : per-axis voxel size range when drawn.
    isotropic_prob, inplane_iso_prob : probability that all three axes (or x and y) share one size.
    b0_dir : fixed B0 direction (array axes), or None to draw one per sample.
    max_tilt_deg : B0 directions are uniform on the spherical cap within this angle of array z.
    axial_prob : probability of exactly ``(0, 0, 1)``.
    pad : zero padding of the dipole convolution (see :func:`qsmnet.physics.pad_amount`).

    Brain-like mask and the head around it
    --------------------------------------
    full_mask_prob : probability of a patch entirely inside the brain (mask all ones).
    mask_radius_frac : main ellipsoid semi-axes as a fraction of the half field of view.
    mask_center_jitter : centre offset as a fraction of the half field of view.
    mask_axis_jitter : each semi-axis is further scaled by a factor in ``1 +- mask_axis_jitter``.
    mask_rotate : rotate the ellipsoids randomly (else they stay aligned with the array axes).
    mask_lobes_max : up to this many extra ellipsoids joined to the main one.
    mask_perturb_frac : largest amplitude (std) of the smooth boundary perturbation, as a fraction
        of the mean radius.
    mask_min_fraction : a mask smaller than this fraction of the patch falls back to the plain
        ellipsoid.
    csf_mm, skull_mm, scalp_mm : layer thicknesses outside the mask (CSF gap, bone, scalp).
    skull_prob : probability that the bone layer exists.
    head_air_prob : probability that air surrounds the scalp (else soft tissue continues).
    skull_ppm, air_ppm, soft_tissue_ppm : susceptibility of bone, air and scalp relative to CSF.
    air_blobs_max, air_blob_radius_mm : sinus / ear-canal air pockets outside the mask.
    distant_sources_max : spheres outside the patch whose (analytic) field reaches in.
    shim_residual_ppm : amplitude range of the residual 1st/2nd-order harmonic shim field at the
        edge of the field of view.

    Susceptibility sources inside the mask
    --------------------------------------
    tissue_base_ppm : constant tissue level.
    tissue_range_ppm : tissue (before strong sources) is clipped to this range.
    shapes_count : number of spheres / ellipsoids / boxes (inclusive integer range).
    shape_probs : relative probabilities of (sphere, ellipsoid, box).
    shape_radius_mm_log : semi-axis range (log-uniform).
    shape_value_ppm : susceptibility of each shape.
    edge_voxels : width of the partial-volume edge ramp, in (smallest) voxels.
    vessels_count, vessel_radius_mm_log, vessel_delta_ppm : vessel-like tubes along smooth random
        curves, paramagnetic by ``vessel_delta_ppm`` above their surroundings.
    smooth_texture_ppm, smooth_texture_mm : amplitude (std) and correlation length (Gaussian
        sigma) of the low-pass texture.
    fine_texture_ppm, fine_texture_voxels : amplitude and band (sigma range, in voxels) of the
        band-pass texture.
    strong_prob : probability that a sample has strong sources.
    strong_count, strong_radius_mm_log : how many and how big.
    haemorrhage_prob : a strong source is haemorrhage-like (positive) with this probability,
        else calcification-like (negative).
    haemorrhage_ppm, calcification_ppm : their values.
    chi_scale_prob, chi_scale_range : QSMnet+-style sample scaling of chi (log-uniform).
    chi_limits_ppm : final clip of chi.

    Noise and acquisition
    ---------------------
    snr_range : peak magnitude SNR (log-uniform); the field noise follows from it, the echo times
        and B0 (see :func:`qsmnet.simulation.acquisition.field_noise_std_ppm`).
    noise_free_prob : probability of a noise-free sample.
    b0_t_choices : field strengths to draw from.
    n_echoes, te_first_s, te_spacing_s : echo train (when ``te_s`` is None).
    te_s : fixed echo times.
    acquisition : also simulate multi-echo magnitude and wrapped phase.
    phase_offset_rad : amplitude range of the smooth receiver phase offset phi0.
    with_total_field : add ``total_field_ppm`` and ``background_field_ppm`` to the sample.
    field_margin_mm : with ``with_total_field``, also measure the field in the CSF up to this
        far (mm) outside the mask, as ``qsmnet predict`` does from phase with its
        ``--field-margin`` (default 2 mm): the sample gets ``field_support`` (the mask and that
        rim, ``(1, X, Y, Z)``), and ``total_field_ppm`` and ``local_field_support_ppm`` (the
        field of the chi in the mask, with noise) on it. 0 (default): the mask alone.
    background_supersample : sub-voxels per axis for the field of the head outside the mask
        (bone, scalp, air; see :func:`qsmnet.physics.voxel_averaged_field`). 1 computes it on
        the voxel grid, whose field of the +9 ppm air is not harmonic in the brain for oblique
        B0 (tilted 25 deg, it leaves 0.020 ppm RMS after RESHARP against 0.00001 ppm with 2).
        With more than 1 the background is computed on the periodic patch (no padding; its
        images lie outside the mask, so their field is harmonic in it): with 2, about the cost
        of the padded voxel-grid FFT.
    """

    # geometry
    voxel_size_mm: tuple[float, float, float] | None = None
    voxel_size_range_mm: Range = (0.6, 2.0)
    isotropic_prob: float = 0.25
    inplane_iso_prob: float = 0.35
    b0_dir: tuple[float, float, float] | None = None
    max_tilt_deg: float = 60.0
    axial_prob: float = 0.15
    pad: Any = "auto"
    # mask and head
    full_mask_prob: float = 0.2
    mask_radius_frac: Range = (0.35, 1.2)
    mask_center_jitter: float = 0.45
    mask_axis_jitter: float = 0.2
    mask_rotate: bool = True
    mask_lobes_max: int = 2
    mask_perturb_frac: float = 0.2
    mask_min_fraction: float = 0.01
    csf_mm: Range = (0.5, 4.0)
    skull_mm: Range = (3.0, 8.0)
    scalp_mm: Range = (2.0, 8.0)
    skull_prob: float = 0.7
    head_air_prob: float = 0.5
    skull_ppm: Range = (-2.5, -1.5)
    air_ppm: Range = (9.2, 9.6)
    soft_tissue_ppm: Range = (-0.05, 0.05)
    air_blobs_max: int = 2
    air_blob_radius_mm: Range = (3.0, 15.0)
    distant_sources_max: int = 3
    shim_residual_ppm: Range = (0.0, 0.3)
    # sources
    tissue_base_ppm: Range = (-0.05, 0.1)
    tissue_range_ppm: Range = (-0.3, 0.6)
    shapes_count: tuple[int, int] = (8, 40)
    shape_probs: tuple[float, float, float] = (0.35, 0.4, 0.25)
    shape_radius_mm_log: Range = (1.0, 15.0)
    shape_value_ppm: Range = (-0.2, 0.4)
    edge_voxels: float = 1.0
    vessels_count: tuple[int, int] = (0, 8)
    vessel_radius_mm_log: Range = (0.3, 1.5)
    vessel_delta_ppm: Range = (0.1, 0.6)
    smooth_texture_ppm: Range = (0.0, 0.06)
    smooth_texture_mm: Range = (4.0, 20.0)
    fine_texture_ppm: Range = (0.0, 0.03)
    fine_texture_voxels: Range = (0.6, 2.0)
    strong_prob: float = 0.3
    strong_count: tuple[int, int] = (1, 3)
    strong_radius_mm_log: Range = (1.0, 6.0)
    haemorrhage_prob: float = 0.5
    haemorrhage_ppm: Range = (0.4, 1.5)
    calcification_ppm: Range = (-1.5, -0.2)
    chi_scale_prob: float = 0.5
    chi_scale_range: Range = (0.5, 2.0)
    chi_limits_ppm: Range = (-3.0, 3.0)
    # noise and acquisition
    snr_range: Range = (20.0, 300.0)
    noise_free_prob: float = 0.05
    b0_t_choices: tuple[float, ...] = (3.0,)
    n_echoes: int = 4
    te_first_s: Range = (0.003, 0.008)
    te_spacing_s: Range = (0.004, 0.010)
    te_s: tuple[float, ...] | None = None
    acquisition: bool = False
    phase_offset_rad: Range = (0.0, 3.0)
    with_total_field: bool = False
    field_margin_mm: float = 0.0
    background_supersample: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            # YAML / OmegaConf lists (and torch or numpy vectors) become plain tuples; a single
            # number for a list of choices becomes a 1-tuple.
            if f.name in ("b0_t_choices", "te_s") and isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(self, f.name, (float(v),))
            elif isinstance(v, Sequence) and not isinstance(v, str):
                setattr(self, f.name, tuple(v))
            elif hasattr(v, "tolist") and not isinstance(v, (bool, int, float)):
                tl = v.tolist()
                setattr(self, f.name, tuple(tl) if isinstance(tl, list) else tl)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def check_range(name: str, lo_min: float | None = None, positive: bool = False) -> None:
            r = getattr(self, name)
            if len(r) != 2 or not all(math.isfinite(float(x)) for x in r) or float(r[0]) > float(r[1]):
                raise ValueError(f"simulator.{name} must be a (low, high) pair with low <= high, got {r!r}")
            if positive and float(r[0]) <= 0:
                raise ValueError(f"simulator.{name} must be positive, got {r!r}")
            if lo_min is not None and float(r[0]) < lo_min:
                raise ValueError(f"simulator.{name} must be >= {lo_min}, got {r!r}")

        for name in ("voxel_size_range_mm", "shape_radius_mm_log", "vessel_radius_mm_log",
                     "strong_radius_mm_log", "chi_scale_range", "snr_range", "smooth_texture_mm",
                     "fine_texture_voxels", "air_blob_radius_mm", "te_spacing_s", "te_first_s",
                     "mask_radius_frac"):
            check_range(name, positive=True)
        for name in ("csf_mm", "skull_mm", "scalp_mm", "shim_residual_ppm", "smooth_texture_ppm",
                     "fine_texture_ppm", "phase_offset_rad"):
            check_range(name, lo_min=0.0)
        for name in ("skull_ppm", "air_ppm", "soft_tissue_ppm", "tissue_base_ppm",
                     "tissue_range_ppm", "shape_value_ppm", "vessel_delta_ppm",
                     "haemorrhage_ppm", "calcification_ppm", "chi_limits_ppm"):
            check_range(name)
        for name in ("shapes_count", "vessels_count", "strong_count"):
            r = getattr(self, name)
            if len(r) != 2 or int(r[0]) < 0 or int(r[0]) > int(r[1]):
                raise ValueError(f"simulator.{name} must be an integer (low, high) pair, got {r!r}")
        for name in ("isotropic_prob", "inplane_iso_prob", "axial_prob", "full_mask_prob",
                     "skull_prob", "head_air_prob", "strong_prob", "haemorrhage_prob",
                     "chi_scale_prob", "noise_free_prob"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"simulator.{name} is a probability in [0, 1], got {p}")
        if not 0.0 <= float(self.max_tilt_deg) <= 90.0:
            raise ValueError(f"simulator.max_tilt_deg must be in [0, 90], got {self.max_tilt_deg}")
        if len(self.shape_probs) != 3 or min(self.shape_probs) < 0 or sum(self.shape_probs) <= 0:
            raise ValueError(f"simulator.shape_probs must be 3 non-negative weights, got {self.shape_probs!r}")
        if self.voxel_size_mm is not None and (len(self.voxel_size_mm) != 3
                                               or min(float(v) for v in self.voxel_size_mm) <= 0):
            raise ValueError(f"simulator.voxel_size_mm must be 3 positive sizes, got {self.voxel_size_mm!r}")
        if self.b0_dir is not None and (len(self.b0_dir) != 3
                                        or sum(float(v) ** 2 for v in self.b0_dir) < 1e-12):
            raise ValueError(f"simulator.b0_dir must be a non-zero 3-vector, got {self.b0_dir!r}")
        if not self.b0_t_choices or min(float(b) for b in self.b0_t_choices) <= 0:
            raise ValueError(f"simulator.b0_t_choices must be positive field strengths, got {self.b0_t_choices!r}")
        if self.te_s is not None:
            te = [float(t) for t in self.te_s]
            if not te or min(te) <= 0 or any(b <= a for a, b in zip(te, te[1:])):
                raise ValueError(f"simulator.te_s must be increasing positive times in s, got {self.te_s!r}")
            if max(te) > 1.0:
                raise ValueError(f"simulator.te_s are in seconds; got {self.te_s!r} (milliseconds?)")
        elif int(self.n_echoes) < 1:
            raise ValueError(f"simulator.n_echoes must be >= 1, got {self.n_echoes}")
        if isinstance(self.background_supersample, bool) or int(self.background_supersample) < 1 \
                or int(self.background_supersample) != self.background_supersample:
            raise ValueError(f"simulator.background_supersample must be an integer >= 1, got "
                             f"{self.background_supersample!r}")
        if not float(self.field_margin_mm) >= 0:
            raise ValueError(f"simulator.field_margin_mm must be >= 0, got {self.field_margin_mm}")
        if float(self.field_margin_mm) > 0 and not self.with_total_field:
            raise ValueError("simulator.field_margin_mm needs simulator.with_total_field: true")
        if float(self.edge_voxels) <= 0:
            raise ValueError(f"simulator.edge_voxels must be positive, got {self.edge_voxels}")
        if not 0.0 <= float(self.mask_axis_jitter) < 1.0:
            raise ValueError(f"simulator.mask_axis_jitter must be in [0, 1), got {self.mask_axis_jitter}")
        if not 0.0 <= float(self.mask_center_jitter) <= 1.0:
            raise ValueError(f"simulator.mask_center_jitter must be in [0, 1], got {self.mask_center_jitter}")

    # ------------------------------------------------------------------ helpers
    @property
    def echo_count(self) -> int:
        """Number of echoes of every sample (fixed so that samples batch)."""
        return len(self.te_s) if self.te_s is not None else int(self.n_echoes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (lists for tuples), e.g. for logging hyper-parameters."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def replace(self, **overrides: Any) -> SimulationConfig:
        """A copy with some fields changed (validated)."""
        return make_config(self, **overrides)


_HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")


def make_config(config: SimulationConfig | Mapping[str, Any] | None = None,
                **overrides: Any) -> SimulationConfig:
    """A :class:`SimulationConfig` from a config, a mapping (dict / OmegaConf) or None (defaults).

    Unknown keys raise ``TypeError`` naming them, so that a typo in a YAML override is not
    silently ignored.
    """
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, SimulationConfig):
        values = {f.name: getattr(config, f.name) for f in fields(config)}
    elif isinstance(config, Mapping):
        values = {str(k): config[k] for k in config.keys() if k not in _HYDRA_KEYS}
    else:
        raise TypeError(f"simulator config must be a SimulationConfig or a mapping, got {type(config).__name__}")
    values.update(overrides)
    known = {f.name for f in fields(SimulationConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown simulator option(s) {unknown}; known: {sorted(known)}")
    return SimulationConfig(**values)
