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

Physics: ``local = forward_field(chi_ppm) * mask`` and ``background = (voxel_averaged_field(chi_bg)
+ analytic fields of distant spheres + harmonic shim residual) * mask`` with the sample's voxel
size and B0 direction (``qsmnet.physics``, ``D(0) = 0``, zero padding ``cfg.pad``); the field of
the head outside the mask is averaged over ``cfg.background_supersample`` sub-voxels per axis
(on the unpadded, periodic patch; with 1 it is computed on the voxel grid with ``cfg.pad``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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
        """Voxel size (mm) and B0 direction from 8 uniform numbers (or the fixed values)."""
        cfg = self.config
        if cfg.voxel_size_mm is not None:
            vs = tuple(float(v) for v in cfg.voxel_size_mm)
        else:
            vs = sample_voxel_size(u[0:5], cfg.voxel_size_range_mm, cfg.isotropic_prob,
                                   cfg.inplane_iso_prob)
        if cfg.b0_dir is not None:
            b = [float(v) for v in cfg.b0_dir]
            n = math.sqrt(sum(v * v for v in b))
            b0 = (b[0] / n, b[1] / n, b[2] / n)
        elif u[5] < cfg.axial_prob:
            b0 = (0.0, 0.0, 1.0)
        else:
            b0 = cap_direction(u[6], u[7], cfg.max_tilt_deg)
        return vs, b0  # type: ignore[return-value]

    # ------------------------------------------------------------------ main entry
    def __call__(self, shape: Shape3, seed: int | None = None, *,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 return_info: bool = False) -> dict[str, torch.Tensor] | tuple[dict, dict]:
        """Simulate one sample of ``shape`` voxels.

        Parameters
        ----------
        shape : int or (X, Y, Z)
        seed : seeds a fresh generator on ``device`` (ignored when ``generator`` is given).
        generator : a ``torch.Generator``; the sample goes to its device.
        device : where to simulate when ``seed`` is used.
        return_info : also return a dict of the drawn parameters (for tests and logging).
        """
        cfg = self.config
        shape = _shape3(shape)
        if generator is None:
            if seed is None:
                raise ValueError("give a seed or a generator")
            generator = make_generator(seed, device)
        g = generator
        dev = g.device
        u = scalars(g, 64)

        vs, b0 = self.draw_geometry(u[0:8])
        axes = grid_axes(shape, vs, dev)
        half = [0.5 * n * v for n, v in zip(shape, vs)]
        half_diag = math.sqrt(sum(h * h for h in half))
        vmin = min(vs)
        edge = float(cfg.edge_voxels) * vmin

        # Echo train, field strength and SNR (also fix the noise level of dipole-stage samples).
        b0_t = float(cfg.b0_t_choices[min(len(cfg.b0_t_choices) - 1,
                                          int(u[8] * len(cfg.b0_t_choices)))])
        if cfg.te_s is not None:
            te = [float(t) for t in cfg.te_s]
        else:
            t1, dt = lerp(u[9], cfg.te_first_s), lerp(u[10], cfg.te_spacing_s)
            te = [t1 + k * dt for k in range(int(cfg.n_echoes))]
        noisy = u[11] >= cfg.noise_free_prob
        snr = log_lerp(u[12], cfg.snr_range) if noisy else math.inf

        # Textures: low-pass (tissue, mask boundary; drawn on a coarser grid when they are smooth
        # enough) and band-pass (fine tissue detail, full resolution). The smooth tissue texture
        # also modulates M0 and R2* in the acquisition.
        need_bg = bool(cfg.with_total_field or cfg.acquisition)
        smooth_sigma = log_lerp(u[13], cfg.smooth_texture_mm)
        mask_sigma = 0.25 * sum(half) / 3.0
        coarse = max(1, min(4, int(min(smooth_sigma, mask_sigma / 3.0) / (1.5 * max(vs)))))
        low = random_textures(g, shape, vs, [(smooth_sigma, None), (mask_sigma, None),
                                             (mask_sigma / 3.0, None)], downsample=coarse)
        f_lo, f_hi = sorted((lerp(u[14], cfg.fine_texture_voxels) * vmin,
                             lerp(u[15], cfg.fine_texture_voxels) * vmin))
        fine = random_textures(g, shape, vs, [(f_lo, max(f_hi, f_lo * 1.5))])[0]

        # Boundary perturbation: broad bumps plus finer, gyrus-sized ones.
        head = random_head(g, axes, vs, cfg, low[1] + 0.5 * low[2], with_background=need_bg)
        mask = head.mask

        # Tissue: base level, shapes painted over it, smooth texture, vessels, fine texture.
        chi = torch.full(shape, lerp(u[16], cfg.tissue_base_ppm), device=dev)
        n_shapes = int_in(u[17], cfg.shapes_count)
        centres = random_mask_points(g, mask, n_shapes, vs)
        shapes = random_shapes(g, n_shapes, centres, cfg.shape_radius_mm_log, cfg.shape_value_ppm,
                               cfg.shape_probs)
        paint_shapes(chi, shapes, vs, edge, mode="over", axes=axes)
        chi.add_(low[0], alpha=lerp(u[18], cfg.smooth_texture_ppm))
        n_vessels = int_in(u[19], cfg.vessels_count)
        if n_vessels:
            vc = random_mask_points(g, mask, n_vessels, vs)
            vu = torch.rand(3, n_vessels, generator=g, device=dev)
            lr = [math.log(float(v)) for v in cfg.vessel_radius_mm_log]
            radii = torch.exp(lr[0] + (lr[1] - lr[0]) * vu[0])
            deltas = cfg.vessel_delta_ppm[0] + (cfg.vessel_delta_ppm[1] - cfg.vessel_delta_ppm[0]) * vu[1]
            lengths = (0.3 + 0.7 * vu[2]) * (2.0 * half_diag)
            chi.add_(vessel_tubes(g, shape, vs, vc, radii, deltas, lengths, edge,
                                  curvature=lerp(u[20], (0.2, 1.0))))
        chi.add_(fine, alpha=lerp(u[21], cfg.fine_texture_ppm))
        chi.clamp_(float(cfg.tissue_range_ppm[0]), float(cfg.tissue_range_ppm[1]))

        # Strong sources (haemorrhage-like positive, calcification-like negative), inside the mask.
        strong_values: list[float] = []
        if u[22] < cfg.strong_prob:
            n_strong = int_in(u[23], cfg.strong_count)
            sc = random_mask_points(g, mask, n_strong, vs)
            strong = random_shapes(g, n_strong, sc, cfg.strong_radius_mm_log, (0.0, 1.0), (0.3, 0.7, 0.0))
            su = scalars(g, 2 * n_strong)
            for k, s in enumerate(strong):
                rng = cfg.haemorrhage_ppm if su[2 * k] < cfg.haemorrhage_prob else cfg.calcification_ppm
                s.value = lerp(su[2 * k + 1], rng)
                strong_values.append(s.value)
            paint_shapes(chi, strong, vs, edge, mode="over", axes=axes)

        chi_scale = log_lerp(u[25], cfg.chi_scale_range) if u[24] < cfg.chi_scale_prob else 1.0
        chi.mul_(chi_scale).clamp_(float(cfg.chi_limits_ppm[0]), float(cfg.chi_limits_ppm[1]))
        maskf = mask.to(torch.float32)
        chi.mul_(maskf)

        # Fields: in-mask sources (local) and, when needed, out-of-mask sources (background), in
        # one batched FFT. The random draws are made either way, so the chi of a seed does not
        # depend on which outputs are asked for.
        n_distant = int_in(u[26], (0, cfg.distant_sources_max))
        du = torch.rand(n_distant, 6, generator=g, device=dev, dtype=torch.float64).cpu().tolist()
        shim_amp = lerp(u[27], cfg.shim_residual_ppm)
        coef = torch.randn(8, generator=g, device=dev, dtype=torch.float64).cpu().tolist()
        background = bg_full = None
        if need_bg:
            k = int(cfg.background_supersample)
            if k == 1:
                both = forward_field(torch.stack([chi, head.chi_background]), vs, b0, pad=cfg.pad)
                local_full, bg_full = both[0], both[1]
            else:
                # the voxel grid's field of the sharp +9 ppm air is not harmonic in the mask for
                # oblique B0 (see voxel_averaged_field); the local field keeps the voxel-grid
                # kernel, which is what the data-consistency loss and inference use. No padding
                # for the background: its periodic images lie outside the mask, so their field is
                # harmonic there too, and padding the sub-voxel grid would cost 8x more.
                local_full = forward_field(chi, vs, b0, pad=cfg.pad)
                bg_full = voxel_averaged_field(head.chi_background, vs, b0, k, pad=None)
            if n_distant:
                cs, rs, xs = [], [], []
                for row in du:
                    cth, phi = 2.0 * row[0] - 1.0, 2.0 * math.pi * row[1]
                    sth = math.sqrt(max(0.0, 1.0 - cth * cth))
                    dist = half_diag * lerp(row[2], (1.1, 1.8))
                    cs.append((dist * sth * math.cos(phi), dist * sth * math.sin(phi), dist * cth))
                    rs.append(lerp(row[3], (0.3, 0.9)) * (dist - half_diag))
                    xs.append(lerp(row[5], cfg.air_ppm) if row[4] < 0.7 else lerp(row[5], cfg.skull_ppm))
                bg_full = bg_full + distant_sphere_field(axes, cs, rs, xs, b0)
            if shim_amp > 0:
                norm = math.sqrt(sum(c * c for c in coef)) or 1.0
                bg_full = bg_full + harmonic_polynomial(axes, [shim_amp * c / norm for c in coef],
                                                        max(half))
            background = bg_full * maskf
        else:
            local_full = forward_field(chi, vs, b0, pad=cfg.pad)
        local_clean = local_full * maskf

        sample: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        nominal_std = field_noise_std_ppm(snr, te, b0_t) if noisy else 0.0
        noise = torch.randn(shape, generator=g, device=dev)
        if cfg.acquisition:
            m0, r2s = tissue_m0_r2star(head.labels, chi, low[0], b0_t)
            pu = scalars(g, 11)
            phi0 = phase_offset(axes, lerp(pu[0], (-math.pi, math.pi)),
                                lerp(pu[1], cfg.phase_offset_rad), [v - 0.5 for v in pu[2:11]])
            field_all = local_full + bg_full
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
        else:
            noise.mul_(nominal_std)
        support = None
        if float(cfg.field_margin_mm) > 0:  # the config has checked with_total_field
            support = maskf  # a patch inside the brain has no rim
            if head.labels is not None:
                # the rim whose field ``qsmnet predict`` also measures, by the same rule
                # (field_support_mask), with brain and CSF as the bright signal (the CSF is)
                bright = ((head.labels == BRAIN) | (head.labels == CSF)).to(torch.float32)
                support = field_support_mask(mask, bright, vs, float(cfg.field_margin_mm),
                                             multi_echo=False).to(torch.float32)
            noise_support = noise * support
        noise.mul_(maskf)
        local = local_clean + noise

        sample.update(
            chi_ppm=chi.unsqueeze(0),
            local_field_ppm=local.unsqueeze(0),
            mask=maskf.unsqueeze(0),
            voxel_size_mm=torch.tensor(vs, dtype=torch.float32, device=dev),
            b0_dir=torch.tensor(b0, dtype=torch.float32, device=dev),
            noise_std_ppm=torch.tensor(nominal_std, dtype=torch.float32, device=dev),
        )
        if cfg.with_total_field:
            bgm = background.unsqueeze(0)
            sample["background_field_ppm"] = bgm
            sample["total_field_ppm"] = sample["local_field_ppm"] + bgm
            if support is not None:
                local_support = local_full * support + noise_support
                sample["field_support"] = support.unsqueeze(0)
                sample["local_field_support_ppm"] = local_support.unsqueeze(0)
                sample["total_field_ppm"] = (local_support + bg_full * support).unsqueeze(0)
        if not return_info:
            return sample
        info.update(
            voxel_size_mm=vs, b0_dir=b0,
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
