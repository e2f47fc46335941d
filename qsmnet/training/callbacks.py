"""Training callbacks: step-interval ``last.ckpt`` that also covers the final step, a one-line
validation summary in the log (readable when the progress bar is not, e.g. in a log file), and a
log of which simulated samples each step trained on."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

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


class BatchLog(L.Callback):
    """Appends one line per training batch to ``path``: ``step<TAB>rank<TAB>e:i,e:i,...``, the
    optimiser steps done before the batch, the process rank and each sample's stream index
    (``sample_index`` of :class:`~qsmnet.training.datamodule.SimulatedDataset`: epoch and index).

    Lines are flushed one by one, so after a kill the file holds every batch that was started;
    a resumed run appends the batches it re-trains, and the last line for a step is the one
    that counts. Used to check that a resumed run trains on exactly the batches of an
    uninterrupted one (``+callbacks.batch_log._target_=qsmnet.training.callbacks.BatchLog
    +callbacks.batch_log.path=batches.tsv``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        index = batch.get("sample_index") if isinstance(batch, dict) else None
        if index is None:
            return
        items = ",".join(f"{int(e)}:{int(i)}" for e, i in index.reshape(-1, 2).tolist())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.global_step}\t{trainer.global_rank}\t{items}\n")


def read_batch_log(path: str | os.PathLike, rank: int = 0) -> dict[int, str]:
    """``{step: "e:i,e:i"}`` of a :class:`BatchLog` file for one rank; a step logged twice (the
    batches a resumed run re-trained after a kill) keeps its last line."""
    steps: dict[int, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        step, line_rank, items = line.split("\t")
        if int(line_rank) == rank:
            steps[int(step)] = items
    return steps
