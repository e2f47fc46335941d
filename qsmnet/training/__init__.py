"""Training: LightningModule, callbacks, metrics and the Hydra entry point.

* :class:`~qsmnet.training.module.QSMLitModule` - network + :class:`qsmnet.losses.QSMLoss`,
  QSM-CI validation metrics and the TKD baseline.
* :func:`~qsmnet.training.train.train` - ``train(cfg)`` used by ``scripts/train.py``.
* :mod:`~qsmnet.training.callbacks` - ``PeriodicCheckpoint``, ``ValidationSummary``.
* ``qsmnet.training.datamodule.SimulatedQSMDataModule`` - simulated training data.
"""

from qsmnet.training.resolvers import register_resolvers

register_resolvers()  # before any config is composed (scripts/train.py, tests)

from qsmnet.training.callbacks import PeriodicCheckpoint, ValidationSummary  # noqa: E402
from qsmnet.training.module import QSMLitModule  # noqa: E402
from qsmnet.training.train import train  # noqa: E402

__all__ = ["PeriodicCheckpoint", "QSMLitModule", "ValidationSummary", "train"]
