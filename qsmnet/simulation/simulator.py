"""The training-sample simulator: random geometry, brain-like mask, sources, fields, noise and
(optionally) a whole multi-echo acquisition — one sample per call, on any device.

A sample (shapes for one sample; the data loader adds a leading batch axis)::

    chi_ppm          (1, X, Y, Z) float32  truth, zero outside the mask
    local_field_ppm  (1, X, Y, Z) float32  D * chi inside the mask, plus noise, masked
    mask             (1, X, Y, Z) float32  0/1
    voxel_size_mm    (3,)         float32  the voxel size used for the forward model
    b0_dir           (3,)         float32  the B0 direction used (unit, array axes)
    noise_std_ppm    ()           float32  nominal field-noise std (0 for noise-free samples)
  with ``with_total_field``:
    background_field_ppm (1, X, Y, Z)      field of the sources outside the mask, masked
    total_field_ppm  (1, X, Y, Z)          local_field_ppm + background_field_ppm
  with ``acquisition``:
    magnitude, phase (E, X, Y, Z)          phase wrapped to [-pi, pi), rad
    te_s (E,)   b0_t ()
  with ``magnitude_prior=True`` (a call argument; draws nothing, so the other keys stay the same):
    magnitude_prior  (1, X, Y, Z) float32  noise-free GRE magnitude ``M0 exp(-R2* mean(TE))``
                                           of the tissue (not masked; see :func:`magnitude_image`)

Physics: ``local = forward_field(chi_ppm) * mask`` and ``background = (voxel_averaged_field(chi_bg)
+ analytic fields of distant spheres + harmonic shim residual) * mask`` with the sample's voxel
size and B0 direction (``qsmnet.physics``, ``D(0) = 0``, zero padding ``cfg.pad``); the field of
the head outside the mask is averaged over ``cfg.background_supersample`` sub-voxels per axis
(on the unpadded, periodic patch; with 1 it is computed on the voxel grid with ``cfg.pad``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

from qsmnet.physics.forward import forward_field, voxel_averaged_field
from qsmnet.simulation.acquisition import (
    field_noise_std_ppm,
    multi_echo_signal,
    phase_offset,
    tissue_m0_r2star,
)
from qsmnet.simulation.config import SimulationConfig, make_config
from qsmnet.simulation.masks import (
    BRAIN,
    CSF,
    distant_sphere_field,
    harmonic_polynomial,
    random_head,
)
from qsmnet.simulation.sampling import (
    cap_direction,
    grid_axes,
    int_in,
    lerp,
    log_lerp,
    make_generator,
    sample_voxel_size,
    scalars,
)
from qsmnet.simulation.sources import (
    paint_shapes,
    random_mask_points,
    random_shapes,
    random_textures,
    vessel_tubes,
)
from qsmnet.transforms.field_support import field_support_mask

Shape3 = int | Sequence[int]


def _shape3(shape: Shape3) -> tuple[int, int, int]:
    s = (int(shape),) * 3 if isinstance(shape, int) else tuple(int(v) for v in shape)
    if len(s) != 3 or min(s) < 4:
        raise ValueError(f"patch shape must be 3 sizes >= 4 (or one int), got {shape!r}")
    return s  # type: ignore[return-value]


def magnitude_image(m0: torch.Tensor, r2star_hz: torch.Tensor, te_s: Sequence[float]) -> torch.Tensor:
    """A single GRE magnitude (a.u.) ``m0 * exp(-r2star_hz * mean(te_s))``, same shape.

    The magnitude a multi-echo scan gives at its mean echo time, noise-free: the prior image
    for the network's ``magnitude`` input channel.
    """
    te = sum(float(t) for t in te_s) / max(1, len(te_s))
    return (m0 * torch.exp(-r2star_hz * te)).to(torch.float32)


def shifted_magnitude(magnitude: torch.Tensor, shift_vox: Sequence[int] | None = None) -> torch.Tensor:
    """An evaluation variant of a magnitude prior whose edges do not coincide with chi's.

    The magnitude circularly shifted by ``shift_vox`` voxels per spatial axis (default: a
    quarter of the size of each axis), so that its tissue edges lie elsewhere than the
    susceptibility edges while its intensity statistics stay the same. A network that has
    learned to copy magnitude edges into chi does worse on it than on the matched magnitude; one
    that uses the magnitude only as a soft prior does not.

    Parameters
    ----------
    magnitude : (..., X, Y, Z) tensor.
    shift_vox : (3,) ints, or None for ``(X // 4, Y // 4, Z // 4)``.

    Returns
    -------
    (..., X, Y, Z) tensor, same dtype and device.
    """
    size = magnitude.shape[-3:]
    shift = [n // 4 for n in size] if shift_vox is None else [int(v) for v in shift_vox]
    if len(shift) != 3:
        raise ValueError(f"shift_vox must be 3 ints, got {shift_vox!r}")
    return torch.roll(magnitude, shifts=shift, dims=(-3, -2, -1))


#: Uniform numbers drawn per sample for the per-sample decisions (one device-to-host copy); the
#: first ones are named in :class:`_SampleDraws`, the rest are spare (still drawn, so that the
#: random stream after them, and so every sample, stays the same).
_N_UNIFORMS = 64
_N_GEOMETRY = 8  # the numbers :meth:`QSMSimulator.draw_geometry` takes


@dataclass(frozen=True)
class _SampleDraws:
    """The per-sample uniform [0, 1) numbers by name, in the order they are drawn."""

    geometry: tuple[float, ...]  # voxel size (5), axial or tilted (1), tilt direction (2)
    b0_t: float                  # field strength (index into cfg.b0_t_choices)
    te_first: float              # first echo time
    te_spacing: float            # echo spacing
    noise_free: float            # >= cfg.noise_free_prob: a noisy sample
    snr: float
    smooth_sigma: float          # scale of the smooth tissue texture
    fine_lo: float               # the two band edges of the fine texture (sorted)
    fine_hi: float
    tissue_base: float           # base tissue chi
    n_shapes: float
    smooth_ppm: float            # amplitude of the smooth tissue texture
    n_vessels: float
    vessel_curvature: float
    fine_ppm: float              # amplitude of the fine texture
    strong: float                # < cfg.strong_prob: strong sources
    n_strong: float
    chi_scale_on: float          # < cfg.chi_scale_prob: scale chi
    chi_scale: float
    n_distant: float             # distant air / bone spheres
    shim: float                  # shim residual amplitude

    @classmethod
    def take(cls, g: torch.Generator) -> _SampleDraws:
        """Draw the numbers from ``g`` (``_N_UNIFORMS`` of them) and name them."""
        u = scalars(g, _N_UNIFORMS)
        names = [f.name for f in fields(cls)][1:]
        return cls(tuple(u[:_N_GEOMETRY]), **dict(zip(names, u[_N_GEOMETRY:])))


assert _N_GEOMETRY + len(fields(_SampleDraws)) - 1 <= _N_UNIFORMS


@dataclass(frozen=True)
class _Geometry:
    """The sample's grid: shape, voxel size (mm), B0 direction and derived extents."""

    shape: tuple[int, int, int]
    vs: tuple[float, float, float]
    b0: tuple[float, float, float]
    device: torch.device
    axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # voxel-centre coordinates, mm
    half: list[float]            # half extent per axis, mm
    half_diag: float             # half diagonal of the patch, mm
    vmin: float                  # smallest voxel size, mm
    edge: float                  # soft edge width of painted shapes, mm


class _Echo(NamedTuple):
    """Field strength, echo times, and the noise decision of one sample."""

    b0_t: float
    te: list[float]
    noisy: bool
    snr: float


class QSMSimulator:
    """Random QSM training samples (see the module docstring for the sample format).

    Parameters
    ----------
    config : :class:`SimulationConfig`, a mapping of its fields, or None for the defaults.
    **overrides : fields to change, e.g. ``QSMSimulator(max_tilt_deg=30, acquisition=True)``.

    Examples
    --------
    >>> sim = QSMSimulator(voxel_size_mm=(1, 1, 1))
    >>> s = sim(32, seed=0)
    >>> tuple(s["chi_ppm"].shape), tuple(s["b0_dir"].shape)
    ((1, 32, 32, 32), (3,))
    """

    def __init__(self, config: SimulationConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        self.config = make_config(config, **overrides)

    def __repr__(self) -> str:
        return f"QSMSimulator({self.config!r})"

    # ------------------------------------------------------------------ geometry
    def draw_geometry(self, u: Sequence[float]) -> tuple[tuple[float, float, float],
                                                         tuple[float, float, float]]:
        """Voxel size (mm) and B0 direction from 8 uniform numbers (or the fixed values).

        The 8 numbers are, in order: 5 for the voxel size (:func:`sample_voxel_size`), 1 for the
        axial-or-tilted choice and 2 for the tilted direction (:func:`cap_direction`).
        """
        cfg = self.config
        u_voxel, u_axial, u_tilt = u[0:5], u[5], u[6:8]
        if cfg.voxel_size_mm is not None:
            vs = tuple(float(v) for v in cfg.voxel_size_mm)
        else:
            vs = sample_voxel_size(u_voxel, cfg.voxel_size_range_mm, cfg.isotropic_prob,
                                   cfg.inplane_iso_prob)
        if cfg.b0_dir is not None:
            b = [float(v) for v in cfg.b0_dir]
            n = math.sqrt(sum(v * v for v in b))
            b0 = (b[0] / n, b[1] / n, b[2] / n)
        elif u_axial < cfg.axial_prob:
            b0 = (0.0, 0.0, 1.0)
        else:
            b0 = cap_direction(u_tilt[0], u_tilt[1], cfg.max_tilt_deg)
        return vs, b0  # type: ignore[return-value]

    def _geometry(self, shape: tuple[int, int, int], draws: _SampleDraws,
                  dev: torch.device) -> _Geometry:
        """Voxel size, B0 direction and the derived patch extents of one sample."""
        vs, b0 = self.draw_geometry(draws.geometry)
        half = [0.5 * n * v for n, v in zip(shape, vs)]
        vmin = min(vs)
        return _Geometry(shape=shape, vs=vs, b0=b0, device=dev, axes=grid_axes(shape, vs, dev),
                         half=half, half_diag=math.sqrt(sum(h * h for h in half)), vmin=vmin,
                         edge=float(self.config.edge_voxels) * vmin)

    def _echo_train(self, draws: _SampleDraws) -> _Echo:
        """Field strength (T), echo times (s), whether the sample is noisy, and its SNR.

        They also fix the noise level of dipole-stage samples (no acquisition).
        """
        cfg = self.config
        b0_t = float(cfg.b0_t_choices[min(len(cfg.b0_t_choices) - 1,
                                          int(draws.b0_t * len(cfg.b0_t_choices)))])
        if cfg.te_s is not None:
            te = [float(t) for t in cfg.te_s]
        else:
            t1, dt = lerp(draws.te_first, cfg.te_first_s), lerp(draws.te_spacing, cfg.te_spacing_s)
            te = [t1 + k * dt for k in range(int(cfg.n_echoes))]
        noisy = draws.noise_free >= cfg.noise_free_prob
        snr = log_lerp(draws.snr, cfg.snr_range) if noisy else math.inf
        return _Echo(b0_t, te, noisy, snr)

    # ------------------------------------------------------------------ susceptibility
    def _textures(self, g: torch.Generator, geo: _Geometry,
                  draws: _SampleDraws) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Low-pass textures (tissue, mask boundary x2) and one band-pass (fine detail) texture.

        The low-pass ones are drawn on a coarser grid when they are smooth enough; the fine one
        at full resolution. The smooth tissue texture also modulates M0 and R2* in the acquisition.
        """
        cfg, shape, vs, vmin = self.config, geo.shape, geo.vs, geo.vmin
        smooth_sigma = log_lerp(draws.smooth_sigma, cfg.smooth_texture_mm)
        mask_sigma = 0.25 * sum(geo.half) / 3.0
        coarse = max(1, min(4, int(min(smooth_sigma, mask_sigma / 3.0) / (1.5 * max(vs)))))
        low = random_textures(g, shape, vs, [(smooth_sigma, None), (mask_sigma, None),
                                             (mask_sigma / 3.0, None)], downsample=coarse)
        f_lo, f_hi = sorted((lerp(draws.fine_lo, cfg.fine_texture_voxels) * vmin,
                             lerp(draws.fine_hi, cfg.fine_texture_voxels) * vmin))
        fine = random_textures(g, shape, vs, [(f_lo, max(f_hi, f_lo * 1.5))])[0]
        return low, fine

    def _tissue(self, g: torch.Generator, geo: _Geometry, draws: _SampleDraws, mask: torch.Tensor,
                smooth: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Tissue chi: base level, shapes painted over it, smooth texture, vessels, fine texture.

        Returns ``(chi, n_shapes, n_vessels)``; chi is clamped to ``cfg.tissue_range_ppm``.
        """
        cfg, shape, vs, dev = self.config, geo.shape, geo.vs, geo.device
        chi = torch.full(shape, lerp(draws.tissue_base, cfg.tissue_base_ppm), device=dev)
        n_shapes = int_in(draws.n_shapes, cfg.shapes_count)
        centres = random_mask_points(g, mask, n_shapes, vs)
        shapes = random_shapes(g, n_shapes, centres, cfg.shape_radius_mm_log, cfg.shape_value_ppm,
                               cfg.shape_probs)
        paint_shapes(chi, shapes, vs, geo.edge, mode="over", axes=geo.axes)
        chi.add_(smooth, alpha=lerp(draws.smooth_ppm, cfg.smooth_texture_ppm))
        n_vessels = int_in(draws.n_vessels, cfg.vessels_count)
        if n_vessels:
            chi.add_(self._vessels(g, geo, draws, mask, n_vessels))
        chi.add_(fine, alpha=lerp(draws.fine_ppm, cfg.fine_texture_ppm))
        chi.clamp_(float(cfg.tissue_range_ppm[0]), float(cfg.tissue_range_ppm[1]))
        return chi, n_shapes, n_vessels

    def _vessels(self, g: torch.Generator, geo: _Geometry, draws: _SampleDraws, mask: torch.Tensor,
                 n_vessels: int) -> torch.Tensor:
        """The chi of ``n_vessels`` random curved tubes through the mask."""
        cfg, dev = self.config, geo.device
        vc = random_mask_points(g, mask, n_vessels, geo.vs)
        u_radius, u_delta, u_length = torch.rand(3, n_vessels, generator=g, device=dev)
        lr = [math.log(float(v)) for v in cfg.vessel_radius_mm_log]
        radii = torch.exp(lr[0] + (lr[1] - lr[0]) * u_radius)
        deltas = cfg.vessel_delta_ppm[0] + (cfg.vessel_delta_ppm[1] - cfg.vessel_delta_ppm[0]) * u_delta
        lengths = (0.3 + 0.7 * u_length) * (2.0 * geo.half_diag)
        return vessel_tubes(g, geo.shape, geo.vs, vc, radii, deltas, lengths, geo.edge,
                            curvature=lerp(draws.vessel_curvature, (0.2, 1.0)))

    def _strong_sources(self, g: torch.Generator, geo: _Geometry, draws: _SampleDraws,
                        mask: torch.Tensor, chi: torch.Tensor) -> list[float]:
        """Paint strong sources (haemorrhage-like positive, calcification-like negative) inside
        the mask over ``chi`` (in place), with probability ``cfg.strong_prob``; their values."""
        cfg = self.config
        strong_values: list[float] = []
        if draws.strong < cfg.strong_prob:
            n_strong = int_in(draws.n_strong, cfg.strong_count)
            sc = random_mask_points(g, mask, n_strong, geo.vs)
            strong = random_shapes(g, n_strong, sc, cfg.strong_radius_mm_log, (0.0, 1.0), (0.3, 0.7, 0.0))
            su = scalars(g, 2 * n_strong)
            for k, s in enumerate(strong):
                u_kind, u_value = su[2 * k], su[2 * k + 1]
                rng = cfg.haemorrhage_ppm if u_kind < cfg.haemorrhage_prob else cfg.calcification_ppm
                s.value = lerp(u_value, rng)
                strong_values.append(s.value)
            paint_shapes(chi, strong, geo.vs, geo.edge, mode="over", axes=geo.axes)
        return strong_values

    def _scale_and_mask(self, draws: _SampleDraws, chi: torch.Tensor,
                        mask: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Scale chi (sometimes), clamp it to ``cfg.chi_limits_ppm`` and zero it outside the mask,
        in place; returns the scale and the float mask."""
        cfg = self.config
        chi_scale = (log_lerp(draws.chi_scale, cfg.chi_scale_range)
                     if draws.chi_scale_on < cfg.chi_scale_prob else 1.0)
        chi.mul_(chi_scale).clamp_(float(cfg.chi_limits_ppm[0]), float(cfg.chi_limits_ppm[1]))
        maskf = mask.to(torch.float32)
        chi.mul_(maskf)
        return chi_scale, maskf

    # ------------------------------------------------------------------ fields
    def _background_draws(self, g: torch.Generator,
                          draws: _SampleDraws) -> tuple[int, list[list[float]], float, list[float]]:
        """The distant spheres (6 numbers each) and the shim residual (amplitude, 8 coefficients).

        They are drawn whether or not the background is computed, so that the chi of a seed does
        not depend on which outputs are asked for.
        """
        cfg, dev = self.config, g.device
        n_distant = int_in(draws.n_distant, (0, cfg.distant_sources_max))
        du = torch.rand(n_distant, 6, generator=g, device=dev, dtype=torch.float64).cpu().tolist()
        shim_amp = lerp(draws.shim, cfg.shim_residual_ppm)
        coef = torch.randn(8, generator=g, device=dev, dtype=torch.float64).cpu().tolist()
        return n_distant, du, shim_amp, coef

    def _fields(self, geo: _Geometry, chi: torch.Tensor, chi_background: torch.Tensor | None,
                need_bg: bool, distant: list[list[float]], shim_amp: float,
                coef: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unmasked fields of the in-mask sources (local) and, when ``need_bg``, of the sources
        outside the mask (background: head, distant spheres, shim residual), in one batched FFT
        where possible. Returns ``(local_full, bg_full)``; ``bg_full`` is None without
        ``need_bg``."""
        cfg, vs, b0 = self.config, geo.vs, geo.b0
        if not need_bg:
            return forward_field(chi, vs, b0, pad=cfg.pad), None
        k = int(cfg.background_supersample)
        if k == 1:
            both = forward_field(torch.stack([chi, chi_background]), vs, b0, pad=cfg.pad)
            local_full, bg_full = both[0], both[1]
        else:
            # the voxel grid's field of the sharp +9 ppm air is not harmonic in the mask for
            # oblique B0 (see voxel_averaged_field); the local field keeps the voxel-grid
            # kernel, which is what the data-consistency loss and inference use. No padding
            # for the background: its periodic images lie outside the mask, so their field is
            # harmonic there too, and padding the sub-voxel grid would cost 8x more.
            local_full = forward_field(chi, vs, b0, pad=cfg.pad)
            bg_full = voxel_averaged_field(chi_background, vs, b0, k, pad=None)
        if distant:
            bg_full = bg_full + self._distant_field(geo, distant)
        if shim_amp > 0:
            norm = math.sqrt(sum(c * c for c in coef)) or 1.0
            bg_full = bg_full + harmonic_polynomial(geo.axes, [shim_amp * c / norm for c in coef],
                                                    max(geo.half))
        return local_full, bg_full

    def _distant_field(self, geo: _Geometry, distant: list[list[float]]) -> torch.Tensor:
        """Field of air / bone spheres outside the patch, one per row of 6 uniform numbers."""
        cfg, half_diag = self.config, geo.half_diag
        cs, rs, xs = [], [], []
        for u_cos, u_phi, u_dist, u_radius, u_kind, u_value in distant:
            cth, phi = 2.0 * u_cos - 1.0, 2.0 * math.pi * u_phi
            sth = math.sqrt(max(0.0, 1.0 - cth * cth))
            dist = half_diag * lerp(u_dist, (1.1, 1.8))
            cs.append((dist * sth * math.cos(phi), dist * sth * math.sin(phi), dist * cth))
            rs.append(lerp(u_radius, (0.3, 0.9)) * (dist - half_diag))
            xs.append(lerp(u_value, cfg.air_ppm) if u_kind < 0.7 else lerp(u_value, cfg.skull_ppm))
        return distant_sphere_field(geo.axes, cs, rs, xs, geo.b0)

    # ------------------------------------------------------------------ acquisition and noise
    def _acquire(self, g: torch.Generator, geo: _Geometry, head: Any, chi: torch.Tensor,
                 smooth: torch.Tensor, field_all: torch.Tensor, echo: _Echo,
                 noise: torch.Tensor, nominal_std: float,
                 sample: dict[str, torch.Tensor], info: dict[str, Any]) -> torch.Tensor:
        """Multi-echo magnitude and wrapped phase of ``field_all`` into ``sample`` / ``info``;
        returns the unit ``noise`` scaled to the per-voxel field noise of the echoes."""
        cfg, dev = self.config, geo.device
        b0_t, te, noisy, snr = echo
        m0, r2s = tissue_m0_r2star(head.labels, chi, smooth, b0_t)
        pu = scalars(g, 11)
        u_offset, u_slope, u_poly = pu[0], pu[1], pu[2:11]
        phi0 = phase_offset(geo.axes, lerp(u_offset, (-math.pi, math.pi)),
                            lerp(u_slope, cfg.phase_offset_rad), [v - 0.5 for v in u_poly])
        mag, phase, clean_mag, sigma = multi_echo_signal(field_all, m0, r2s, phi0,
                                                         te, b0_t, snr if noisy else None, g)
        if noisy:
            # Per-voxel field noise from the echo magnitudes (peak of echo 1 = 1).
            peak = float(clean_mag[0].max()) or 1.0
            std_map = field_noise_std_ppm(snr, te, b0_t, clean_mag / peak)
            std_map = torch.clamp(std_map, max=20.0 * nominal_std)
            noise = noise * std_map
        else:
            noise = noise * 0.0
        sample.update(magnitude=mag, phase=phase,
                      te_s=torch.tensor(te, dtype=torch.float32, device=dev),
                      b0_t=torch.tensor(b0_t, dtype=torch.float32, device=dev))
        info.update(m0=m0, r2star=r2s, phase_offset=phi0, signal_sigma=sigma,
                    field_ppm=field_all)
        return noise

    def _field_support(self, geo: _Geometry, head: Any, mask: torch.Tensor,
                       maskf: torch.Tensor) -> torch.Tensor | None:
        """The region whose field is measured (``cfg.field_margin_mm > 0``), else None.

        The mask and the CSF rim within the margin, by the rule ``qsmnet predict`` also uses
        (:func:`field_support_mask`), with brain and CSF as the bright signal (the CSF is).
        """
        if not float(self.config.field_margin_mm) > 0:  # the config has checked with_total_field
            return None
        if head.labels is None:
            return maskf  # a patch inside the brain has no rim
        bright = ((head.labels == BRAIN) | (head.labels == CSF)).to(torch.float32)
        return field_support_mask(mask, bright, geo.vs, float(self.config.field_margin_mm),
                                  multi_echo=False).to(torch.float32)

    @staticmethod
    def _add_total_field(sample: dict[str, torch.Tensor], background: torch.Tensor,
                         local_full: torch.Tensor, bg_full: torch.Tensor,
                         support: torch.Tensor | None, noise_support: torch.Tensor | None) -> None:
        """Add the background and total fields to ``sample`` (which has the local field), and,
        with a field support, the support and the local and total fields measured on it."""
        bgm = background.unsqueeze(0)
        sample["background_field_ppm"] = bgm
        sample["total_field_ppm"] = sample["local_field_ppm"] + bgm
        if support is not None:
            local_support = local_full * support + noise_support
            sample["field_support"] = support.unsqueeze(0)
            sample["local_field_support_ppm"] = local_support.unsqueeze(0)
            sample["total_field_ppm"] = (local_support + bg_full * support).unsqueeze(0)

    # ------------------------------------------------------------------ main entry
    def __call__(self, shape: Shape3, seed: int | None = None, *,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 return_info: bool = False,
                 magnitude_prior: bool = False) -> dict[str, torch.Tensor] | tuple[dict, dict]:
        """Simulate one sample of ``shape`` voxels.

        Parameters
        ----------
        shape : int or (X, Y, Z)
        seed : seeds a fresh generator on ``device`` (ignored when ``generator`` is given).
        generator : a ``torch.Generator``; the sample goes to its device.
        device : where to simulate when ``seed`` is used.
        return_info : also return a dict of the drawn parameters (for tests and logging).
        magnitude_prior : also return ``magnitude_prior`` (see the module docstring): M0 and R2*
            of the tissue (:func:`~qsmnet.simulation.acquisition.tissue_m0_r2star`, as the
            acquisition uses) at the sample's field strength and echo times. It draws no random
            numbers, so every other key is the same with or without it.
        """
        cfg = self.config
        shape = _shape3(shape)
        if generator is None:
            if seed is None:
                raise ValueError("give a seed or a generator")
            generator = make_generator(seed, device)
        g = generator
        dev = g.device
        draws = _SampleDraws.take(g)
        geo = self._geometry(shape, draws, dev)
        echo = b0_t, te, noisy, snr = self._echo_train(draws)

        need_bg = bool(cfg.with_total_field or cfg.acquisition)
        low, fine = self._textures(g, geo, draws)
        # Boundary perturbation: broad bumps plus finer, gyrus-sized ones.
        head = random_head(g, geo.axes, geo.vs, cfg, low[1] + 0.5 * low[2], with_background=need_bg)
        mask = head.mask
        chi, n_shapes, n_vessels = self._tissue(g, geo, draws, mask, low[0], fine)
        strong_values = self._strong_sources(g, geo, draws, mask, chi)
        chi_scale, maskf = self._scale_and_mask(draws, chi, mask)

        n_distant, du, shim_amp, coef = self._background_draws(g, draws)
        local_full, bg_full = self._fields(geo, chi, head.chi_background, need_bg, du, shim_amp,
                                           coef)
        background = bg_full * maskf if need_bg else None
        local_clean = local_full * maskf

        sample: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        nominal_std = field_noise_std_ppm(snr, te, b0_t) if noisy else 0.0
        noise = torch.randn(shape, generator=g, device=dev)
        if cfg.acquisition:
            noise = self._acquire(g, geo, head, chi, low[0], local_full + bg_full, echo, noise,
                                  nominal_std, sample, info)
        else:
            noise.mul_(nominal_std)
        support = self._field_support(geo, head, mask, maskf)
        noise_support = noise * support if support is not None else None
        noise.mul_(maskf)
        local = local_clean + noise

        sample.update(
            chi_ppm=chi.unsqueeze(0),
            local_field_ppm=local.unsqueeze(0),
            mask=maskf.unsqueeze(0),
            voxel_size_mm=torch.tensor(geo.vs, dtype=torch.float32, device=dev),
            b0_dir=torch.tensor(geo.b0, dtype=torch.float32, device=dev),
            noise_std_ppm=torch.tensor(nominal_std, dtype=torch.float32, device=dev),
        )
        if cfg.with_total_field:
            self._add_total_field(sample, background, local_full, bg_full, support, noise_support)
        if magnitude_prior:
            # without the head around it (no background), the patch is brain inside the mask
            labels = (head.labels if head.labels is not None
                      else torch.where(mask, BRAIN, CSF).to(torch.uint8))
            m0, r2s = tissue_m0_r2star(labels, chi, low[0], b0_t)
            sample["magnitude_prior"] = magnitude_image(m0, r2s, te).unsqueeze(0)
        if not return_info:
            return sample
        b0 = geo.b0
        info.update(
            voxel_size_mm=geo.vs, b0_dir=b0,
            tilt_deg=math.degrees(math.acos(max(-1.0, min(1.0, abs(b0[2]))))),
            b0_t=b0_t, te_s=te, snr=snr, noise_std_ppm=nominal_std, chi_scale=chi_scale,
            n_shapes=n_shapes, n_vessels=n_vessels, strong_values=strong_values,
            n_strong=len(strong_values), full_mask=head.full, labels=head.labels,
            chi_background_ppm=head.chi_background, local_field_clean_ppm=local_clean,
            noise_ppm=noise, n_distant=n_distant, shim_amplitude_ppm=shim_amp,
        )
        return sample, info


def simulate_sample(shape: Shape3, seed: int, config: SimulationConfig | Mapping | None = None,
                    device: torch.device | str = "cpu", **overrides: Any) -> dict[str, torch.Tensor]:
    """One simulated sample: ``QSMSimulator(config, **overrides)(shape, seed, device=device)``."""
    return QSMSimulator(config, **overrides)(shape, seed, device=device)  # type: ignore[return-value]
