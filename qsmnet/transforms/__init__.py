"""Classical QSM preprocessing and baselines as torch transforms (CPU or CUDA)."""

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
from qsmnet.transforms.field_support import FieldSupport, field_support_mask
from qsmnet.transforms.inversion import (
    TKD,
    TVADMM,
    ClosedFormL2,
    closed_form_l2,
    reference_to_mask_mean,
    tkd,
    tv_admm,
)

__all__ = [
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
    "Transform",
    "closed_form_l2",
    "field_support_mask",
    "pdf",
    "reference_to_mask_mean",
    "resharp",
    "tkd",
    "tv_admm",
    "vresharp",
    "vsharp",
]
