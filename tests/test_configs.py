"""Every Hydra config composes; data, model and trainer instantiate; experiments do what they say."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

import qsmnet.training  # noqa: F401 - registers the config resolvers (${qsmnet_default:...})
from qsmnet.transforms.field_support import DEFAULT_FIELD_MARGIN_MM

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The groups of configs/train.yaml (configs/preprocess/ belongs to the inference pipeline).
TRAIN_GROUPS = ("data", "model", "loss", "optim", "trainer", "logger", "callbacks", "paths",
                "experiment", "debug")
SMALL_DATA = "data=simulated_small"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _compose(overrides=(), hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_every_group_has_options():
    for group in TRAIN_GROUPS:
        assert _options(group), f"configs/{group}/ is empty"
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(_options("trainer"))
    required = {"no_dc", "dc_only", "field_only_input", "l2_residual", "small_unet", "shipped"}
    assert required <= set(_options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in TRAIN_GROUPS for o in _options(g)])
def test_every_option_composes(group, option, tmp_path):
    cfg = _compose([f"{group}={option}", f"paths.output_dir={tmp_path}"])
    # everything the run needs is present and resolvable
    for key in ("data", "model", "loss", "module", "trainer", "paths", "seed", "task_name"):
        assert key in cfg, key
    from omegaconf import OmegaConf

    OmegaConf.resolve(cfg)


def test_defaults_and_paths(tmp_path):
    cfg = _compose(hydra_cfg=True)
    assert cfg.ckpt_path is None and isinstance(cfg.seed, int)
    assert cfg.optimized_metric == "val/nrmse"
    assert cfg.data._target_ == "qsmnet.training.datamodule.SimulatedQSMDataModule"
    assert cfg.model._target_ == "qsmnet.models.QSMNet"
    assert list(cfg.model.channels) == ["local_field", "tkd", "l2", "mask"] and cfg.model.residual_from == "tkd"
    assert cfg.hydra.run.dir == cfg.paths.output_dir
    assert cfg.paths.output_dir.startswith(f"{cfg.paths.log_dir}/train/runs/")
    assert "/train/multiruns/" in cfg.hydra.sweep.dir
    # the checkpoint callbacks write into the run dir, best by val/nrmse (min) + last
    cb = cfg.callbacks
    assert cb.best_checkpoint.monitor == "val/nrmse" and cb.best_checkpoint.mode == "min"
    assert cb.best_checkpoint.dirpath == f"{cfg.paths.output_dir}/checkpoints"
    assert cb.last_checkpoint.every_n_train_steps > 0
    assert cfg.optim.scheduler.T_max == cfg.trainer.max_steps
    # a run dir override moves everything
    cfg = _compose([f"paths.output_dir={tmp_path}"], hydra_cfg=True)
    assert cfg.hydra.run.dir == str(tmp_path)
    assert cfg.logger.tensorboard.save_dir == f"{tmp_path}/tensorboard"


def test_instantiate_data_model_trainer(tmp_path):
    cfg = _compose([SMALL_DATA, f"paths.output_dir={tmp_path}"])
    dm = instantiate(cfg.data)
    assert type(dm).__name__ == "SimulatedQSMDataModule"
    module = instantiate(cfg.module)
    assert type(module).__name__ == "QSMLitModule"
    assert type(module.net).__name__ == "QSMNet" and type(module.loss_fn).__name__ == "QSMLoss"
    assert module.loss_fn.w_dc == cfg.loss.w_dc and module.net.scale == cfg.model.scale
    opt = module.configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.AdamW)
    assert opt["lr_scheduler"]["scheduler"].T_max == cfg.trainer.max_steps
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_steps == cfg.trainer.max_steps
    assert Path(trainer.default_root_dir) == tmp_path
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "PeriodicCheckpoint",
                                                      "LearningRateMonitor"}


def test_anatomical_mix_is_off_by_default_and_reaches_the_data_module(tmp_path):
    cfg = _compose([SMALL_DATA, f"paths.output_dir={tmp_path}", "data.val_size=0"])
    assert cfg.data.anatomical_fraction == 0.0 and cfg.data.val_anatomical_fraction == 0.0
    dm = instantiate(cfg.data)
    assert dm.anatomical is None and dm.train_set.anatomical_fraction == 0.0
    cfg = _compose([SMALL_DATA, f"paths.output_dir={tmp_path}", "data.val_size=0",
                    "experiment=anatomical_mix", "data.anatomical.scale_range=[0.9,1.0]"])
    dm = instantiate(cfg.data)  # builds the source; the atlas is read on the first sample only
    assert dm.train_set.anatomical_fraction == 0.5
    assert dm.anatomical is not None and dm.anatomical.scale_range == (0.9, 1.0)
    assert dm.anatomical.config.voxel_size_range_mm == (1.2, 2.0)
    assert dm.hparams["anatomical_fraction"] == 0.5


def test_ddp_cpu_trainer_instantiates_with_gloo(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = _compose([SMALL_DATA, "trainer=ddp_cpu", f"paths.output_dir={tmp_path}"])
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._process_group_backend == "gloo"
    assert trainer.num_devices == 2
    ddp = _compose(["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"])
    assert ddp.trainer.strategy.process_group_backend == "nccl"
    assert ddp.trainer.devices == 8 and ddp.trainer.num_nodes == 2


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_instantiates_its_model(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    net = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    if experiment == "no_dc":
        assert loss.w_dc == 0 and loss.w_sup > 0
    if experiment == "dc_only":
        assert loss.w_sup == 0 and loss.w_grad == 0 and loss.w_dc > 0
    if experiment == "field_only_input":
        assert net.inputs.channels == ("local_field", "mask") and net.residual_from is None
    if experiment == "small_unet":
        assert net.unet.features == (8, 16, 32)
    if experiment == "l2_residual":
        assert net.inputs.channels == ("local_field", "l2", "mask") and net.residual_from == "l2"
    if experiment == "shipped":
        assert net.unet.features == (16, 32, 64, 128)
    if experiment == "magnitude_prior":  # the extra channel and the data that feeds it
        assert net.inputs.channels == ("local_field", "tkd", "l2", "magnitude", "mask")
        assert net.inputs.num_channels == 5 and cfg.data.magnitude_prior
        assert cfg.data.val_magnitude_variant == "matched"
    if experiment == "anatomical_mix":  # training mix only: validated on the baseline's samples
        assert cfg.data.anatomical_fraction == 0.5 and cfg.data.val_anatomical_fraction == 0.0
    if experiment == "tv_residual_pdf":  # trains on the rim `qsmnet predict` uses by default
        assert cfg.data.bfr == "pdf" and cfg.data.simulator.with_total_field
        assert cfg.data.simulator.field_margin_mm == DEFAULT_FIELD_MARGIN_MM
    assert cfg.task_name != "train"  # experiments log to their own folder


def test_optimizer_and_scheduler_are_partials():
    cfg = _compose()
    opt = instantiate(cfg.optim.optimizer)
    sched = instantiate(cfg.optim.scheduler)
    assert isinstance(opt, functools.partial) and isinstance(sched, functools.partial)
    cfg = _compose(["optim=adam_constant"])
    assert cfg.optim.scheduler is None



def test_transform_classes_keep_their_functions_defaults():
    """A transform class (the Hydra/dict form) and the function it wraps share each default."""
    import inspect

    import qsmnet.transforms as T

    pairs = [(cls, fn) for cls in vars(T).values() if inspect.isclass(cls)
             for fn in vars(T).values()
             if inspect.isfunction(fn) and fn.__name__.replace("_", "").lower() == cls.__name__.lower()]
    assert {c.__name__ for c, _ in pairs} >= {"PDF", "VSHARP", "RESHARP", "VRESHARP", "TKD",
                                               "TVADMM", "ClosedFormL2"}
    for cls, fn in pairs:
        mine = inspect.signature(cls.__init__).parameters
        theirs = inspect.signature(fn).parameters
        for name in set(mine) & set(theirs) - {"self"}:
            assert mine[name].default == theirs[name].default, f"{cls.__name__}.{name}"
