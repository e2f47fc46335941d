"""Training callbacks: step-interval ``last.ckpt`` that also covers the final step, and a one-line
validation summary in the log (readable when the progress bar is not, e.g. in a log file)."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` every ``every_n_train_steps`` steps **and at
    the end of training**, so a killed run loses at most ``every_n_train_steps`` steps and a
    finished run's ``last.ckpt`` is its final state.

    Defaults: no monitor, ``save_top_k=0``, ``save_last=True`` (only ``last.ckpt`` is kept).
    """

    def __init__(self, dirpath=None, every_n_train_steps: int = 100, **kwargs) -> None:
        kwargs.setdefault("save_top_k", 0)
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("monitor", None)
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidationSummary(L.Callback):
    """Logs ``step N/M | train/loss | val/nrmse (TKD, L2 first estimate) | s/step`` after each
    validation (global rank 0, not during the sanity check)."""

    def __init__(self, keys: tuple[str, ...] = ("val/loss", "val/hfen", "val/xsim")) -> None:
        self.keys = tuple(keys)
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        parts = [f"step {trainer.global_step}/{trainer.max_steps if trainer.max_steps > 0 else '?'}"]
        if "train/loss" in m or "train/loss_step" in m:
            parts.append(f"train/loss {m.get('train/loss', m.get('train/loss_step')):.4g}")
        if "val/nrmse" in m:
            base = [f"{name} {m[key]:.1f}%" for name, key in (("TKD", "val/nrmse_tkd"), ("L2", "val/nrmse_l2"),
                                                             ("TV", "val/nrmse_tv"))
                    if key in m]
            parts.append(f"val/nrmse {m['val/nrmse']:.1f}%" + (f" ({', '.join(base)})" if base else ""))
        parts += [f"{k} {m[k]:.4g}" for k in self.keys if k in m]
        if self._t0 is not None and trainer.global_step > self._step0:
            parts.append(f"{(time.perf_counter() - self._t0) / (trainer.global_step - self._step0):.2f} s/step")
        log.info(" | ".join(parts))
