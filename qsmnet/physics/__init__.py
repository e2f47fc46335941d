"""Physics core: units, geometry, k-space kernels, finite differences and the forward model.

Everything here is pure torch, device-agnostic, differentiable where that makes sense and
batched over leading dimensions: a volume is ``(..., X, Y, Z)`` indexed as nibabel returns it.
"""

from qsmnet.physics.forward import (
    DipoleConvolution,
    forward_field,
    pad_amount,
    voxel_averaged_field,
)
from qsmnet.physics.geometry import (
    Geometry,
    affine_from_b0_dir,
    as_voxel_size_mm,
    b0_dir_from_affine,
    normalize_b0_dir,
    rotation_between,
)
from qsmnet.physics.kernels import (
    dipole_kernel,
    kspace_grid,
    laplacian_eigenvalues,
    smv_kernel,
    sphere_mask,
    sphere_weights,
)
from qsmnet.physics.operators import divergence, gradient, laplacian
from qsmnet.physics.units import (
    GAMMA_BAR_MHZ_PER_T,
    TE_MAX_S,
    echo_time_problem,
    hz_to_ppm,
    phase_to_ppm,
    ppm_to_hz,
    ppm_to_phase,
)

__all__ = [
    "GAMMA_BAR_MHZ_PER_T",
    "TE_MAX_S",
    "DipoleConvolution",
    "Geometry",
    "affine_from_b0_dir",
    "as_voxel_size_mm",
    "echo_time_problem",
    "b0_dir_from_affine",
    "dipole_kernel",
    "divergence",
    "forward_field",
    "gradient",
    "hz_to_ppm",
    "kspace_grid",
    "laplacian",
    "laplacian_eigenvalues",
    "normalize_b0_dir",
    "pad_amount",
    "phase_to_ppm",
    "ppm_to_hz",
    "ppm_to_phase",
    "rotation_between",
    "smv_kernel",
    "sphere_mask",
    "sphere_weights",
    "voxel_averaged_field",
]
