"""Classical QSM preprocessing and baselines as torch transforms (CPU or CUDA)."""

from qsmnet.transforms.base import Compose, DictTransform, Transform
from qsmnet.transforms.inversion import TKD, ClosedFormL2, closed_form_l2, tkd

__all__ = ["TKD", "ClosedFormL2", "Compose", "DictTransform", "Transform", "closed_form_l2", "tkd"]
