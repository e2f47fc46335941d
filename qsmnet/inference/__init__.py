"""Inference on new subjects: dipole methods, the reconstruction chain, CLI handlers."""

from qsmnet.inference.cropping import CropPad, mask_bbox, plan_crop_pad
from qsmnet.inference.dipole import CLASSICAL_METHODS, dc_refine, make_inverter
from qsmnet.inference.pipeline import Reconstruction, reconstruct

__all__ = ["CLASSICAL_METHODS", "CropPad", "Reconstruction", "dc_refine", "make_inverter",
           "mask_bbox", "plan_crop_pad", "reconstruct"]
