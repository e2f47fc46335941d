"""Classical QSM preprocessing and baselines as torch transforms (CPU or CUDA)."""

from qsmnet.transforms._echoes import check_te_s
from qsmnet.transforms.background import (
    PDF,
    RESHARP,
    VRESHARP,
    VSHARP,
    pdf,
    resharp,
    vresharp,
    vsharp,
)
from qsmnet.transforms.base import Compose, DictTransform, Transform
from qsmnet.transforms.echo_fit import MultiEchoFit, estimate_noise_std, fit_field_wls
from qsmnet.transforms.field_support import FieldSupport, field_support_mask
from qsmnet.transforms.lbv import LBV, lbv
from qsmnet.transforms.inversion import (
    TKD,
    TVADMM,
    ClosedFormL2,
    closed_form_l2,
    reference_to_mask_mean,
    tkd,
    tv_admm,
)
from qsmnet.transforms.phase_offsets import (
    PhaseOffsetRemoval,
    fit_phase_polynomial,
    mcpc3ds_phase_offset,
    remove_phase_offset,
    smooth_phase_offset,
)
from qsmnet.transforms.smoothing import gaussian_smooth_mm
from qsmnet.transforms.temporal_unwrapping import TemporalUnwrap, temporal_unwrap

__all__ = [
    "LBV",
    "PDF",
    "RESHARP",
    "TKD",
    "TVADMM",
    "VRESHARP",
    "VSHARP",
    "ClosedFormL2",
    "Compose",
    "DictTransform",
    "FieldSupport",
    "MultiEchoFit",
    "PhaseOffsetRemoval",
    "TemporalUnwrap",
    "Transform",
    "check_te_s",
    "closed_form_l2",
    "estimate_noise_std",
    "field_support_mask",
    "fit_field_wls",
    "fit_phase_polynomial",
    "gaussian_smooth_mm",
    "lbv",
    "mcpc3ds_phase_offset",
    "pdf",
    "reference_to_mask_mean",
    "remove_phase_offset",
    "resharp",
    "smooth_phase_offset",
    "temporal_unwrap",
    "tkd",
    "tv_admm",
    "vresharp",
    "vsharp",
]
