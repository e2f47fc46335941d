"""SimulatedQSMDataModule: batch format, a fixed validation set, an exactly repeatable training
stream (any number of workers), new data every epoch, Hydra configs and Lightning's epoch hook."""

from pathlib import Path

import lightning as L
import pytest
import torch

from qsmnet.simulation import SimulationConfig
from qsmnet.training.datamodule import EpochSampler, SimulatedQSMDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = dict(patch_size=16, batch_size=2, steps_per_epoch=2, val_size=3,
             simulator={"shapes_count": (2, 6), "vessels_count": (0, 2)})


pytestmark = pytest.mark.usefixtures("single_thread")


def _batches(dm, n=None):
    out = []
    for i, b in enumerate(dm.train_dataloader()):
        out.append(b)
        if n is not None and i + 1 >= n:
            break
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_format():
    dm = SimulatedQSMDataModule(**SMALL, seed=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for key in ("chi_ppm", "local_field_ppm", "mask"):
        assert batch[key].shape == (2, 1, 16, 16, 16) and batch[key].dtype == torch.float32
    assert batch["voxel_size_mm"].shape == (2, 3) and batch["b0_dir"].shape == (2, 3)
    assert len(dm.train_dataloader()) == 2
    vb = next(iter(dm.val_dataloader()))
    assert vb["chi_ppm"].shape == (2, 1, 16, 16, 16)
    # Two samples of a batch differ.
    assert not torch.equal(batch["chi_ppm"][0], batch["chi_ppm"][1])


def test_acquisition_batches():
    dm = SimulatedQSMDataModule(**{**SMALL, "simulator": {"acquisition": True, "n_echoes": 3,
                                                          "with_total_field": True}})
    batch = next(iter(dm.train_dataloader()))
    assert batch["phase"].shape == (2, 3, 16, 16, 16) and batch["magnitude"].shape == (2, 3, 16, 16, 16)
    assert batch["te_s"].shape == (2, 3) and batch["b0_t"].shape == (2,)
    assert batch["total_field_ppm"].shape == (2, 1, 16, 16, 16)


def test_validation_set_fixed_across_instances_and_training_seeds():
    a = SimulatedQSMDataModule(**SMALL, seed=1)
    b = SimulatedQSMDataModule(**SMALL, seed=2)
    a.setup("fit")
    b.setup("validate")
    va, vb = list(a.val_dataloader()), list(b.val_dataloader())
    assert len(va) == len(vb) == 2
    assert all(_same(x, y) for x, y in zip(va, vb))
    # Validation never reuses a training sample.
    train = _batches(a)[0]
    assert not torch.equal(train["chi_ppm"][0], va[0]["chi_ppm"][0])
    other = SimulatedQSMDataModule(**SMALL, val_seed=99)
    assert not torch.equal(list(other.val_dataloader())[0]["chi_ppm"], va[0]["chi_ppm"])


def test_training_stream_repeats_with_seed_and_changes_every_epoch():
    a = SimulatedQSMDataModule(**SMALL, seed=5)
    b = SimulatedQSMDataModule(**SMALL, seed=5)
    c = SimulatedQSMDataModule(**SMALL, seed=6)
    a0, b0, c0 = _batches(a), _batches(b), _batches(c)
    assert all(_same(x, y) for x, y in zip(a0, b0))
    assert not torch.equal(a0[0]["chi_ppm"], c0[0]["chi_ppm"])
    # The next pass is the next epoch: new samples, again identical across instances.
    a1, b1 = _batches(a), _batches(b)
    assert all(_same(x, y) for x, y in zip(a1, b1))
    assert not torch.equal(a0[0]["chi_ppm"], a1[0]["chi_ppm"])
    # seek (what a resumed run does) replays an epoch exactly.
    a.train_sampler.seek(0)
    assert all(_same(x, y) for x, y in zip(a0, _batches(a)))
    state = b.state_dict()
    fresh = SimulatedQSMDataModule(**SMALL, seed=5)
    fresh.load_state_dict(state)
    assert all(_same(x, y) for x, y in zip(_batches(b), _batches(fresh)))


def test_workers_give_the_same_stream():
    serial = SimulatedQSMDataModule(**{**SMALL, "steps_per_epoch": 3}, seed=3, num_workers=0)
    parallel = SimulatedQSMDataModule(**{**SMALL, "steps_per_epoch": 3}, seed=3, num_workers=2,
                                      persistent_workers=False)
    s, p = _batches(serial), _batches(parallel)
    assert len(s) == len(p) == 3
    assert all(_same(x, y) for x, y in zip(s, p))
    # Different workers simulate different samples (no duplicated batches).
    assert not torch.equal(p[0]["chi_ppm"], p[1]["chi_ppm"])


def test_epoch_sampler():
    s = EpochSampler(3)
    assert list(s) == [(0, 0), (0, 1), (0, 2)]
    assert list(s) == [(1, 0), (1, 1), (1, 2)]
    s.seek(7)
    assert list(s)[0] == (7, 0) and len(s) == 3
    # part-way into an epoch (a resumed run): the rest of that epoch, then whole epochs
    s.seek(2, start=2)
    assert list(s) == [(2, 2)] and list(s) == [(3, 0), (3, 1), (3, 2)]
    assert s.current == 3
    with pytest.raises(ValueError, match="outside"):
        s.seek(0, start=4)


def test_seed_none_follows_global_seed():
    L.seed_everything(321, verbose=False)
    assert SimulatedQSMDataModule(**SMALL, seed=None).seed == 321


def test_hydra_configs_instantiate_with_overrides():
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    with initialize_config_dir(config_dir=str(CONFIGS / "data"), version_base="1.3"):
        small = compose(config_name="simulated_small",
                        overrides=["seed=4", "simulator.max_tilt_deg=20", "patch_size=16"])
        full = compose(config_name="simulated", overrides=["seed=0"])
    dm = instantiate(small)
    assert isinstance(dm, SimulatedQSMDataModule)
    assert dm.patch_shape == (16, 16, 16) and dm.seed == 4
    assert dm.simulator_config.max_tilt_deg == 20
    assert dm.simulator_config.voxel_size_range_mm == (0.6, 2.0)
    assert dm.simulator_config.shapes_count == (4, 16)
    # The YAML lists every simulator option, with the dataclass defaults.
    listed = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(full.simulator).items()}
    defaults = SimulationConfig()
    assert set(listed) == set(defaults.to_dict())
    for k, v in listed.items():
        assert v == getattr(defaults, k), k
    assert instantiate(full).patch_shape == (64, 64, 64)


def test_unknown_simulator_option_is_an_error():
    with pytest.raises(TypeError, match="max_tilt"):
        SimulatedQSMDataModule(**{**SMALL, "simulator": {"max_tilt": 3}})


def test_lightning_sets_epochs():
    """Under Lightning's fit loop, epoch e sees the stream's epoch e."""
    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch["chi_ppm"].sum().item()))
            return (self.w * batch["local_field_ppm"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = SimulatedQSMDataModule(**SMALL, seed=8)
    trainer = L.Trainer(max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0)
    trainer.fit(Probe(), datamodule=dm)
    ref = SimulatedQSMDataModule(**SMALL, seed=8)
    expected = []
    for epoch in range(2):
        ref.train_sampler.seek(epoch)
        expected += [(epoch, b["chi_ppm"].sum().item()) for b in _batches(ref)]
    assert seen == expected


def test_precomputed_tv_estimate_matches_the_network_own():
    from qsmnet.models import QSMNet

    params = {"tv_lam": 5e-5, "tv_iterations": 20, "pad": 12}
    dm = SimulatedQSMDataModule(**SMALL, seed=3, estimates=["tv"], estimate_params=params)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["estimate_tv"].shape == batch["chi_ppm"].shape
    net = QSMNet(channels=["local_field", "tv", "mask"], residual_from="tv", unet={"features": [4, 8]},
                 tv_lam=5e-5, tv_iterations=20, pad=12)
    _, own = net.predict(batch["local_field_ppm"], batch["mask"], batch["voxel_size_mm"], batch["b0_dir"])
    torch.testing.assert_close(batch["estimate_tv"], own["tv"], rtol=1e-4, atol=1e-6)
    vb = next(iter(dm.val_dataloader()))
    assert "estimate_tv" in vb
    with pytest.raises(ValueError, match="unknown estimates"):
        SimulatedQSMDataModule(**SMALL, estimates=["medi"])


def _plain_and_pdf_batches(**simulator):
    """One batch without and one with ``data.bfr=pdf`` (same seed), and a check that the
    second's input is PDF of the first's total field on the field support (or the mask),
    sample by sample."""
    from qsmnet.transforms.background import pdf

    sim = {**SMALL["simulator"], "with_total_field": True, "full_mask_prob": 0.0, **simulator}
    plain = SimulatedQSMDataModule(**{**SMALL, "simulator": sim}, seed=5)
    bfr = SimulatedQSMDataModule(**{**SMALL, "simulator": sim}, seed=5, bfr="pdf",
                                 bfr_params={"max_iter": 30})
    a, b = _batches(plain, 1)[0], _batches(bfr, 1)[0]
    region = a["field_support"] if "field_support" in a else a["mask"]
    for i in range(2):
        direct, _ = pdf(a["total_field_ppm"][i, 0], region[i, 0] != 0,
                        a["voxel_size_mm"][i].double(), a["b0_dir"][i].double(), max_iter=30)
        torch.testing.assert_close(b["local_field_ppm"][i, 0], direct.float(), rtol=1e-4,
                                   atol=1e-6)
    return a, b


def test_bfr_samples_feed_the_network_what_pdf_makes_of_the_total_field():
    a, b = _plain_and_pdf_batches()
    # the chi truth and the simulated local field are untouched (moved, for the physics loss)
    assert torch.equal(a["chi_ppm"], b["chi_ppm"]) and torch.equal(a["mask"], b["mask"])
    assert torch.equal(b["local_field_true_ppm"], a["local_field_ppm"])
    sim = {**SMALL["simulator"], "with_total_field": True, "full_mask_prob": 0.0}
    for i in range(2):
        m = a["mask"][i, 0] != 0

        def err(x, m=m, truth=a["local_field_ppm"][i, 0]):
            d, t = x[m] - x[m].mean(), truth[m] - truth[m].mean()
            return float((d - t).norm() / t.norm())

        # the background (skull, air, shim residual) is gone: far closer to the local field
        assert err(b["local_field_ppm"][i, 0]) < 0.5 * err(a["total_field_ppm"][i, 0])
    with pytest.raises(ValueError, match="with_total_field"):
        SimulatedQSMDataModule(**SMALL, bfr="pdf")
    with pytest.raises(ValueError, match="unknown data.bfr"):
        SimulatedQSMDataModule(**{**SMALL, "simulator": sim}, bfr="harperella")


def test_bfr_with_the_csf_rim_runs_on_brain_and_rim_as_predict_does():
    """simulator.field_margin_mm: PDF runs on the brain and its CSF rim, and the network is
    trained on that region with the field of the brain's chi there as the physics truth."""
    a, b = _plain_and_pdf_batches(csf_mm=(3.0, 4.0), field_margin_mm=2.0)
    assert torch.equal(a["chi_ppm"], b["chi_ppm"])
    assert torch.equal(b["mask"], a["field_support"])       # PDF keeps its mask
    assert bool((a["field_support"] > a["mask"]).any())     # the rim is there
    assert torch.equal(b["local_field_true_ppm"], a["local_field_support_ppm"])
