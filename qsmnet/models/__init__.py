"""The network: a configurable 3-D U-Net behind a kernel-aware input builder.

* :class:`~qsmnet.models.unet.UNet3D` - depth/width/norm/activation/up-sampling as arguments.
* :class:`~qsmnet.models.inputs.InputBuilder` - input channels (local field, TKD, closed-form
  L2 with each sample's own geometry, mask) at a fixed ppm scale.
* :class:`~qsmnet.models.qsm_net.QSMNet` - ``forward(local_field_ppm, mask, voxel_size_mm,
  b0_dir) -> chi_ppm``; ``QSMNet.from_checkpoint(path)`` loads a trained model.
"""

from qsmnet.models.inputs import InputBuilder
from qsmnet.models.qsm_net import CHECKPOINT_CONFIG_KEY, QSMNet
from qsmnet.models.unet import UNet3D, make_act, make_norm

__all__ = ["CHECKPOINT_CONFIG_KEY", "InputBuilder", "QSMNet", "UNet3D", "make_act", "make_norm"]
