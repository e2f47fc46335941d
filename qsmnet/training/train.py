"""``train(cfg)``: build everything from the Hydra config, fit, return the monitored metric.

``scripts/train.py`` is a thin ``@hydra.main`` wrapper around :func:`train`. The config tree is
``configs/train.yaml`` (see ``docs/training.md``):

* ``data`` - a LightningDataModule (``_target_``),
* ``module`` - :class:`qsmnet.training.module.QSMLitModule` whose ``net``, ``loss``,
  ``optimizer`` and ``scheduler`` interpolate the ``model``, ``loss`` and ``optim`` groups,
* ``trainer``, ``callbacks`` (dict of ``_target_`` nodes), ``logger`` (dict of ``_target_`` nodes),
* ``paths``, ``seed``, ``ckpt_path`` (resume), ``init_from`` (fine-tune), ``task_name``,
  ``optimized_metric``.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from qsmnet.io.errors import QSMInputError
from qsmnet.training.provenance import lineage_of, release_lineage, run_overrides, stage

log = logging.getLogger(__name__)


def _hydra_output_dir() -> str | None:
    """The output dir of the running Hydra job (run dir or multirun sub-dir), if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().runtime.output_dir
    except (ImportError, ValueError):  # pragma: no cover - hydra-core is a dependency
        return None
    return None


def instantiate_dict(nodes: Mapping[str, Any] | None, kind: str) -> list[Any]:
    """Instantiate every ``_target_`` node of a dict config (``None`` entries are skipped)."""
    out: list[Any] = []
    if not nodes:
        return out
    if not isinstance(nodes, Mapping | DictConfig):
        raise TypeError(f"{kind} config must be a dict of _target_ nodes, got {type(nodes).__name__}")
    for name, node in nodes.items():
        if node is None:
            continue
        if not isinstance(node, Mapping | DictConfig) or "_target_" not in node:
            raise ValueError(f"{kind}.{name} must be a node with a _target_")
        out.append(hydra.utils.instantiate(node))
    return out


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: None (fresh run), a file, or ``"last"``.

    ``"last"`` resumes from ``${paths.output_dir}/checkpoints/last.ckpt``; when this run's output
    dir has none (a new timestamped dir), it falls back to the newest ``last.ckpt`` of an earlier
    run of the same task under ``${paths.log_dir}/${task_name}/runs/``.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, "", "null"):
        return None
    if str(ckpt) == "last":
        own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        pattern = os.path.join(str(cfg.paths.log_dir), str(cfg.task_name), "runs", "*", "checkpoints",
                               "last.ckpt")
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"ckpt_path=last: no {own} and no earlier run matching {pattern}; "
                                    f"pass paths.output_dir=<run dir> or ckpt_path=<file>")
        log.info("ckpt_path=last: %s has no checkpoint; resuming from the newest run: %s", own, found[-1])
        return found[-1]
    path = Path(str(ckpt))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no such checkpoint file: {path}")
    return str(path)


def check_resume_config(ckpt_path: str, module: Any) -> None:
    """Fail early, with one line naming the file, when ``ckpt_path`` is not a qsmnet training
    checkpoint (:func:`~qsmnet.inference.model_store.read_checkpoint`), and with the differing
    keys when it holds another architecture (:class:`~qsmnet.io.errors.QSMInputError`)."""
    from qsmnet.inference.model_store import read_checkpoint
    from qsmnet.models.qsm_net import CHECKPOINT_CONFIG_KEY

    saved = read_checkpoint(ckpt_path)[CHECKPOINT_CONFIG_KEY]
    net = getattr(module, "net", None)
    if not hasattr(net, "get_config"):
        return
    current = net.get_config()
    if saved is None or saved == current:
        return
    _, details = _config_diff(saved, current, "checkpoint")
    raise QSMInputError(f"cannot resume {ckpt_path}: it was trained with a different model ({details}). "
                     f"Resume with the run's own overrides (see .hydra/overrides.yaml in its folder).")


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], source: str
                 ) -> tuple[list[str], str]:
    """The model config keys that differ (sorted) and one line naming them with both values
    (``source`` labels the saved side)."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    details = "; ".join(f"model.{k}: {source} {saved.get(k)!r}, config {current.get(k)!r}"
                        for k in keys)
    return keys, details


def _added_channels(saved: Mapping[str, Any], current: Mapping[str, Any],
                    differing: list[str]) -> list[str] | None:
    """The input channels ``current`` adds to ``saved`` when that is the only difference
    (``differing`` is ``["channels"]``; the saved channels kept, in their order), else None."""
    if differing != ["channels"]:
        return None
    old, new = list(saved["channels"]), list(current["channels"])
    kept = [c for c in new if c in old]
    if kept != old or len(new) == len(old):
        return None
    return [c for c in new if c not in old]


def _widened_state(source: Any, target: Any, old: list[str], new: list[str]) -> dict[str, Any]:
    """``source``'s weights for ``target``, whose input has the channels ``new`` (a superset of
    ``old``): the first convolution's kernels of the added channels are zero, so the widened
    network computes exactly the source's function whatever the new inputs hold, and training
    starts from it."""
    import torch

    have, want = source.state_dict(), target.state_dict()
    state = {}
    for name, value in have.items():
        shape = tuple(want[name].shape)
        if tuple(value.shape) == shape:
            state[name] = value
            continue
        if value.dim() < 2 or value.shape[1] != len(old) or shape[1] != len(new) \
                or tuple(value.shape[:1]) + tuple(value.shape[2:]) != shape[:1] + shape[2:]:
            raise QSMInputError(f"cannot widen {name}: {tuple(value.shape)} -> {shape}")
        widened = torch.zeros(shape, dtype=value.dtype)
        for i, c in enumerate(old):
            widened[:, new.index(c)] = value[:, i]
        state[name] = widened
    return state


def init_weights(module: Any, spec: str) -> None:
    """Start from trained weights (fine-tuning): ``spec`` is ``"unet"`` (the shipped model), a
    release ``.pt`` or a training ``.ckpt``. The architecture must be the configured one, except
    that the configured network may take more input channels (``model.channels``, the source's
    kept in order, for example ``magnitude`` added): their first-layer weights start at zero, so
    the fine-tune starts from the source's function. The optimiser, step count and data stream
    start afresh (unlike ``ckpt_path``, which resumes). The source's lineage is kept, so the
    run's checkpoints name every training run behind them
    (:mod:`qsmnet.training.provenance`)."""
    from qsmnet.inference.model_store import load_network

    source, meta = load_network(spec)
    if hasattr(module, "lineage_parents"):
        # a release's metadata holds its lineage; a checkpoint's needs the checkpoint dict
        module.lineage_parents = (lineage_of(spec) if str(spec).endswith(".ckpt")
                                  else release_lineage(meta))
    net = getattr(module, "net", None)
    if not hasattr(net, "get_config"):
        raise QSMInputError(f"init_from={spec!r}: the configured network is not a QSMNet")
    saved, current = source.get_config(), net.get_config()
    if saved == current:
        net.load_state_dict(source.state_dict())
        log.info("initialised the network from %s", spec)
        return
    differing, details = _config_diff(saved, current, spec)
    added = _added_channels(saved, current, differing)
    if added is None:
        raise QSMInputError(f"init_from={spec!r} has a different architecture ({details})")
    net.load_state_dict(_widened_state(source, net, list(saved["channels"]),
                                       list(current["channels"])))
    log.info("initialised the network from %s; new input channels %s start at zero weight",
             spec, added)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, LightningModule, callbacks, loggers and trainer from ``cfg``."""
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    callbacks = instantiate_dict(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    if not loggers:
        dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        if dropped:
            log.info("no logger configured: LearningRateMonitor disabled")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "module": module, "callbacks": callbacks, "loggers": loggers,
            "trainer": trainer}


def train(cfg: DictConfig) -> float | None:
    """Seed, build, fit (resuming from ``ckpt_path``), and return the best ``optimized_metric``.

    The return value is what Hydra sweepers minimise; it is the best monitored score of the
    checkpoint callback when there is one, else the last logged value, else None.
    """
    out_dir = _hydra_output_dir()
    if out_dir is not None and os.path.abspath(out_dir) != os.path.abspath(str(cfg.paths.output_dir)):
        # Multirun sub-dirs and DDP child processes: the Hydra output dir is the truth.
        with open_dict(cfg):
            cfg.paths.output_dir = out_dir
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    parts = build(cfg)
    trainer: L.Trainer = parts["trainer"]
    module = parts["module"]
    if hasattr(module, "run_stage"):
        module.run_stage = stage(run_overrides(), cfg.get("seed"))
    if trainer.is_global_zero:
        for lg in parts["loggers"]:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        n_params = sum(p.numel() for p in module.parameters())
        log.info("output dir: %s | %d trainable parameters", cfg.paths.output_dir, n_params)

    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
        check_resume_config(ckpt_path, module)
    elif cfg.get("init_from"):
        init_weights(module, str(cfg.init_from))
    trainer.fit(module, datamodule=parts["datamodule"], ckpt_path=ckpt_path)
    if (cfg.get("validate_at_end", True) and not trainer.fast_dev_run and trainer.global_step > 0
            and getattr(module, "last_validated_step", trainer.global_step) != trainer.global_step
            and not trainer.interrupted):
        # Stopped between validations (max_time): score the final model too, so the log and the
        # returned metrics describe the weights in last.ckpt.
        log.info("validating the final model (step %d)", trainer.global_step)
        trainer.validate(module, datamodule=parts["datamodule"], verbose=False)

    metric_name = cfg.get("optimized_metric")
    best = None
    for cb in parts["callbacks"]:
        if (metric_name and getattr(cb, "monitor", None) == metric_name
                and getattr(cb, "best_model_score", None) is not None):
            best = {"value": float(cb.best_model_score), "path": cb.best_model_path}
            if trainer.is_global_zero:
                log.info("best %s = %.4g (%s)", metric_name, best["value"], best["path"])
            break
    if trainer.is_global_zero and not trainer.fast_dev_run:
        write_run_summary(Path(cfg.paths.output_dir) / "metrics.json", trainer, metric_name, best)
    if not metric_name:
        return None
    if best is not None:
        return best["value"]
    value = trainer.callback_metrics.get(metric_name)
    return None if value is None else float(value)


def write_run_summary(path: Path, trainer: L.Trainer, metric_name: str | None,
                      best: Mapping[str, Any] | None) -> None:
    """Write ``metrics.json``: the last logged metrics, the best monitored score, the step count
    and the Hydra choices (e.g. ``experiment``), so sweeps can be tabulated without TensorBoard."""
    from qsmnet.io.atomic import atomic_write_json

    choices: dict[str, Any] = {}
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choices = {k: v for k, v in HydraConfig.get().runtime.choices.items()
                       if not k.startswith("hydra/")}
    except (ImportError, ValueError):  # pragma: no cover - hydra-core is a dependency
        pass
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    atomic_write_json(path, {"global_step": int(trainer.global_step), "choices": choices,
                             "optimized_metric": metric_name, "best": dict(best) if best else None,
                             "last": metrics})
