"""LightningModule: trains a dipole-inversion network with :class:`qsmnet.losses.QSMLoss`.

Everything is injected (Hydra ``_target_`` + :func:`hydra.utils.instantiate`): the network, the
loss, the optimizer and the optional LR scheduler (both ``functools.partial`` objects, Hydra
``_partial_: true``).

Batches are dicts with ``chi_ppm``, ``local_field_ppm``, ``mask`` (``(B, 1, X, Y, Z)``) and
``voxel_size_mm``, ``b0_dir`` (``(B, 3)``).

Logged: ``train/loss`` and its components ``train/{sup,dc,grad}``; ``val/loss`` and components;
per validation sample the QSM-CI metrics ``val/nrmse`` (demeaned NRMSE, %), ``val/nrmse_detrended``,
``val/hfen``, ``val/xsim`` (inside the sample's mask, not eroded); the baselines
``val/nrmse_tkd`` (TKD on the same batch), ``val/nrmse_tv`` (its TV first estimate, when it has one) and ``val/nrmse_l2`` (the network's closed-form L2 first
estimate, when it has one); and a TensorBoard figure of orthogonal slices (field, TKD,
prediction, truth, error) of the first validation sample.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from qsmnet.losses import QSMLoss
from qsmnet.models.inputs import ESTIMATE_PARAMS, classical_estimate, precomputed
from qsmnet.models.qsm_net import CHECKPOINT_CONFIG_KEY
from qsmnet.training.provenance import LINEAGE_KEY, stage
from qsmnet.training.metrics import volume_metrics
from qsmnet.transforms.inversion import DEFAULT_INVERSION_PAD, tkd

log = logging.getLogger(__name__)

BATCH_KEYS = ("chi_ppm", "local_field_ppm", "mask", "voxel_size_mm", "b0_dir")


def describe_partial(factory: Any) -> dict[str, Any] | None:
    """A plain-dict description of an optimizer / scheduler factory (for hparams)."""
    if factory is None:
        return None
    if isinstance(factory, functools.partial):
        func = factory.func
        name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
        kwargs = {k: v if isinstance(v, int | float | str | bool | type(None)) else repr(v)
                  for k, v in factory.keywords.items()}
        return {"target": name, **kwargs}
    return {"target": repr(factory)}


class QSMLitModule(L.LightningModule):
    """Lightning wrapper around a QSM network.

    Parameters
    ----------
    net : nn.Module
        ``net(local_field_ppm, mask, voxel_size_mm, b0_dir) -> chi_ppm``, typically
        :class:`qsmnet.models.QSMNet` (whose ``predict`` also returns its first estimates).
    loss : QSMLoss
    optimizer : callable ``params -> torch.optim.Optimizer`` (a partial)
    scheduler : callable ``optimizer -> LRScheduler`` (a partial) or None
    scheduler_interval : "step" | "epoch"
    tkd_threshold : float
        Threshold of the TKD baseline logged as ``val/nrmse_tkd``.
    log_images : bool
        Add a slice figure of the first validation sample to TensorBoard at each validation.
    full_metrics : bool
        Also compute detrended NRMSE, HFEN and XSIM (else NRMSE only).
    """

    def __init__(self, net: nn.Module, loss: QSMLoss, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, scheduler_interval: str = "step",
                 tkd_threshold: float = 0.15, log_images: bool = True, full_metrics: bool = True) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        # Only plain values go into hparams, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(logger=False, ignore=["net", "loss", "optimizer", "scheduler"])
        self.hparams.update({
            "net_config": net.get_config() if hasattr(net, "get_config") else repr(net),
            "loss_config": loss.get_config() if hasattr(loss, "get_config") else repr(loss),
            "optimizer": describe_partial(optimizer),
            "scheduler": describe_partial(scheduler),
        })
        self.net = net
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        #: global step of the last completed validation (-1: none yet)
        self.last_validated_step = -1
        #: the lineage of the weights this run started from (``init_from``; see
        #: :mod:`qsmnet.training.provenance`) and this run's own stage, without its step count
        self.lineage_parents: list[dict[str, Any]] = []
        self.run_stage: dict[str, Any] = stage(None, None)

    def on_fit_start(self) -> None:
        """Refuse precomputed estimates made with other parameters than the network's own."""
        dm = getattr(self.trainer, "datamodule", None)
        inputs = getattr(self.net, "inputs", None)
        if dm is None or inputs is None or not getattr(dm, "estimates", ()):
            return
        mine = inputs.estimate_params
        defaults = {k: p.default for k, p in inspect.signature(classical_estimate).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        theirs = {**defaults, **dict(getattr(dm, "estimate_params", {}))}
        bad = {k: (theirs[k], mine[k]) for name in dm.estimates for k in ESTIMATE_PARAMS[name]
               if theirs[k] != mine[k]}
        if bad:
            raise ValueError("data.estimate_params differ from the model's estimate parameters "
                             f"(data, model): {bad}; interpolate them from the model config")

    # -- core -------------------------------------------------------------------------------
    def forward(self, local_field_ppm, mask, voxel_size_mm, b0_dir) -> torch.Tensor:
        return self.net(local_field_ppm, mask, voxel_size_mm, b0_dir)

    @staticmethod
    def _unpack(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
        return tuple(batch[k] for k in BATCH_KEYS)

    def _step(self, batch, stage: str, extra_estimates=()):
        chi, field, mask, vs, b0 = self._unpack(batch)
        if hasattr(self.net, "predict"):
            pred, estimates = self.net.predict(field, mask, vs, b0, extra_estimates=extra_estimates,
                                               provided=precomputed(batch))
        else:
            pred, estimates = self.net(field, mask, vs, b0), {}
        # With data.bfr the network sees a background-removed field; the physics term is taken
        # against the field the truth actually produces.
        total, parts = self.loss_fn(pred, chi, batch.get("local_field_true_ppm", field), mask, vs, b0)
        bs = chi.shape[0]
        sync = stage != "train"
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=bs, sync_dist=sync,
                 on_step=stage == "train", on_epoch=stage != "train")
        for name, value in parts.items():
            self.log(f"{stage}/{name}", value, batch_size=bs, sync_dist=sync,
                     on_step=stage == "train", on_epoch=stage != "train")
        return total, pred, estimates

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        total, _, _ = self._step(batch, "train")
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        _, pred, estimates = self._step(batch, "val")
        chi, field, mask, vs, b0 = self._unpack(batch)
        inputs = getattr(self.net, "inputs", None)
        if ("tkd" in estimates and getattr(inputs, "tkd_threshold", None) == self.hparams.tkd_threshold
                and getattr(inputs, "pad", None) == DEFAULT_INVERSION_PAD):
            base_tkd = estimates["tkd"]  # the network already computed this exact baseline
        else:
            base_tkd = tkd(field, mask, vs, b0, threshold=self.hparams.tkd_threshold)
        pred_np = pred.detach().float().cpu().numpy()[:, 0]
        chi_np = chi.detach().float().cpu().numpy()[:, 0]
        mask_np = mask.detach().float().cpu().numpy()[:, 0]
        tkd_np = base_tkd.detach().float().cpu().numpy()[:, 0]
        others = {n: estimates[n].detach().float().cpu().numpy()[:, 0] for n in ("l2", "tv")
                  if n in estimates}
        rows: dict[str, list[float]] = {}
        for i in range(pred_np.shape[0]):
            for k, v in volume_metrics(pred_np[i], chi_np[i], mask_np[i], self.hparams.full_metrics).items():
                rows.setdefault(k, []).append(v)
            rows.setdefault("nrmse_tkd", []).append(volume_metrics(tkd_np[i], chi_np[i], mask_np[i], False)["nrmse"])
            for n, est_np in others.items():
                rows.setdefault(f"nrmse_{n}", []).append(
                    volume_metrics(est_np[i], chi_np[i], mask_np[i], False)["nrmse"])
        bs = chi.shape[0]
        for k, values in rows.items():
            value = torch.tensor(float(np.nanmean(values)), dtype=torch.float32, device=self.device)
            self.log(f"val/{k}", value, batch_size=bs, sync_dist=True, prog_bar=k in ("nrmse", "nrmse_tkd"))
        if batch_idx == 0 and self.hparams.log_images:
            self._log_slices(field[0, 0], base_tkd[0, 0], pred[0, 0], chi[0, 0], mask[0, 0])

    def on_validation_epoch_end(self) -> None:
        if self.trainer is not None and not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step

    # -- images -----------------------------------------------------------------------------
    def _log_slices(self, field, base_tkd, pred, truth, mask) -> None:
        if self.trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        writers = [lg.experiment for lg in self.loggers if hasattr(getattr(lg, "experiment", None), "add_figure")]
        if not writers:
            return
        fig = slice_figure(field, base_tkd, pred, truth, mask)
        for w in writers:
            w.add_figure("val/slices", fig, global_step=self.global_step, close=False)
        import matplotlib.pyplot as plt

        plt.close(fig)

    # -- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        config = {"scheduler": scheduler, "interval": self.hparams.scheduler_interval, "frequency": 1}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self.net, "get_config"):
            checkpoint[CHECKPOINT_CONFIG_KEY] = self.net.get_config()
        checkpoint[LINEAGE_KEY] = [*self.lineage_parents,
                                   {**self.run_stage, "global_step": int(self.global_step)}]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming continues the same stage: keep the sources it was started from.
        if checkpoint.get(LINEAGE_KEY):
            self.lineage_parents = [dict(s) for s in checkpoint[LINEAGE_KEY][:-1]]


def _center_of_mass(mask: np.ndarray) -> tuple[int, int, int]:
    idx = np.argwhere(mask > 0)
    if idx.size == 0:
        return tuple(s // 2 for s in mask.shape)
    return tuple(int(round(c)) for c in idx.mean(axis=0))


def slice_figure(field, base_tkd, pred, truth, mask, vmax: float | None = None):
    """Matplotlib figure: rows = the three orthogonal slices through the mask centre; columns =
    local field, TKD, prediction, truth, error (prediction - truth), chi in ppm."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from qsmnet.transforms.inversion import reference_to_mask_mean

    m = mask.detach().float()
    vols = {
        "local field (ppm)": field.detach().float() * m,
        "TKD": base_tkd.detach().float(),
        "prediction": pred.detach().float(),
        "truth": reference_to_mask_mean(truth.detach().float(), m),
    }
    vols["error"] = vols["prediction"] - vols["truth"]
    vols = {k: v.cpu().numpy() for k, v in vols.items()}
    centre = _center_of_mass(m.cpu().numpy())
    if vmax is None:
        t = vols["truth"][m.cpu().numpy() > 0]
        vmax = float(np.percentile(np.abs(t), 99)) if t.size else 0.1
        vmax = vmax if vmax > 0 else 0.1
    fmax = float(np.percentile(np.abs(vols["local field (ppm)"]), 99)) or 0.05
    fig, axes = plt.subplots(3, 5, figsize=(12.5, 7.5))
    for row, axis in enumerate(range(3)):
        for col, (name, vol) in enumerate(vols.items()):
            sl = np.take(vol, centre[axis], axis=axis)
            lim = fmax if col == 0 else vmax
            ax = axes[row, col]
            ax.imshow(sl.T, cmap="gray", vmin=-lim, vmax=lim, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        axes[row, 0].set_ylabel("xyz"[axis] + f" = {centre[axis]}", fontsize=9)
    fig.suptitle(f"chi window +/-{vmax:.3f} ppm, field window +/-{fmax:.3f} ppm", fontsize=9)
    fig.tight_layout()
    return fig
