"""Score a network on the fixed validation set of the run that trained it.

A checkpoint's ``ModelCheckpoint`` state holds the best score of the validations run *before* it
was written, which is not the score of its own weights when the periodic checkpoint is written
before the validation of the same step. :func:`validate_checkpoint` measures the weights
themselves, on the validation samples the run used: they are simulated again from the
datamodule hyperparameters the checkpoint stores (the set depends only on ``val_seed``,
``val_size``, the patch shape and the simulator, see :class:`SimulatedQSMDataModule`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from qsmnet.io.errors import QSMInputError
from qsmnet.models.inputs import precomputed
from qsmnet.training.datamodule import SimulatedQSMDataModule
from qsmnet.training.metrics import volume_metrics

DATAMODULE_KEY = "datamodule_hyper_parameters"


@torch.no_grad()
def validate_network(net: nn.Module, datamodule_hparams: Mapping[str, Any],
                     full: bool = True) -> dict[str, float]:
    """Mean validation metrics of ``net`` on the validation set described by ``datamodule_hparams``.

    Parameters
    ----------
    net : a :class:`qsmnet.models.QSMNet` (or any module called as
        ``net(local_field_ppm, mask, voxel_size_mm, b0_dir)``), in eval mode on the CPU.
    datamodule_hparams : the ``datamodule_hyper_parameters`` of a training checkpoint.
    full : also HFEN, XSIM and the detrended NRMSE (needs ``qsm-ci``).

    Returns
    -------
    ``{"val/nrmse": ..., ...}``: the means over the validation samples, as the training run logs
    them (demeaned NRMSE and HFEN in %, inside each sample's mask).
    """
    # simulated on the CPU, where the network is, whatever device the run simulated on
    params = {k: v for k, v in dict(datamodule_hparams).items()
              if k not in ("num_workers", "device")}
    dm = SimulatedQSMDataModule(**params, num_workers=0, device="cpu")
    rows: dict[str, list[float]] = {}
    for sample in dm.validation_samples():
        batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        args = (batch["local_field_ppm"], batch["mask"], batch["voxel_size_mm"], batch["b0_dir"])
        if hasattr(net, "predict"):
            pred, _ = net.predict(*args, provided=precomputed(batch))
        else:
            pred = net(*args)
        metrics = volume_metrics(pred[0, 0].float().numpy(), batch["chi_ppm"][0, 0].numpy(),
                                 batch["mask"][0, 0].numpy(), full)
        for k, v in metrics.items():
            rows.setdefault(f"val/{k}", []).append(v)
    return {k: float(np.nanmean(v)) for k, v in rows.items()}


def validate_checkpoint(ckpt: Mapping[str, Any], net: nn.Module, full: bool = True) -> dict[str, float]:
    """:func:`validate_network` on the validation set of the run that wrote ``ckpt``."""
    if DATAMODULE_KEY not in ckpt:
        raise QSMInputError("the checkpoint has no datamodule hyperparameters: its validation set "
                            "cannot be rebuilt (not written by scripts/train.py?)")
    return validate_network(net, ckpt[DATAMODULE_KEY], full)
