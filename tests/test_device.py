"""The pipeline on an accelerator gives the CPU's answer.

The device under test is ``QSMNET_TEST_DEVICE`` (default: ``cuda`` when available; without one
the module is skipped, as in CI). ``QSMNET_TEST_DEVICE=cpu`` runs the same comparisons CPU
against CPU, which checks the tests themselves on a machine without a GPU.

The truths are the CPU results (themselves tested against analytic fields, known wraps and
peer libraries elsewhere) and, for the end-to-end run, the simulated susceptibility: a device
must reproduce the CPU figure, not merely run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qsmnet.models import QSMNet
from qsmnet.physics import forward_field
from qsmnet.transforms.background import BFR_METHODS, remove_background
from qsmnet.transforms.inversion import closed_form_l2, tkd, tv_brain_data
from qsmnet.transforms.unwrap import unwrap_laplacian

DEVICE = os.environ.get("QSMNET_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")

pytestmark = [
    pytest.mark.skipif(not DEVICE, reason="no accelerator (set QSMNET_TEST_DEVICE=cpu to check "
                                          "the tests themselves)"),
    pytest.mark.usefixtures("single_thread"),
]

VS = (1.0, 1.2, 1.5)
B0 = (0.2, -0.3, 0.93)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of ``a`` (moved to the CPU) from ``b``."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def phantom():
    """Blocks and a sphere of chi in an ellipsoidal mask; float32 like real inputs."""
    g = torch.Generator().manual_seed(0)
    shape = (40, 36, 32)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape],
                                     indexing="ij"))
    centre = torch.tensor([n / 2 for n in shape]).reshape(3, 1, 1, 1)
    mask = (((idx - centre) / torch.tensor([15.0, 13.0, 11.0]).reshape(3, 1, 1, 1)) ** 2
            ).sum(0) <= 1
    chi = torch.zeros(shape)
    for _ in range(6):
        lo = torch.randint(6, 24, (3,), generator=g)
        chi[lo[0]:lo[0] + 5, lo[1]:lo[1] + 4, lo[2]:lo[2] + 3] += float(torch.rand(1, generator=g)) * 0.2
    chi[((idx - centre) ** 2).sum(0) <= 9] = 0.3
    chi = chi * mask
    field = forward_field(chi, VS, B0)
    return chi, field, mask


def test_forward_field_matches_cpu(phantom):
    chi, field, _ = phantom
    on_device = forward_field(chi.to(DEVICE), VS, B0)
    assert on_device.device.type == torch.device(DEVICE).type
    assert _rel(on_device, field) < 1e-5


def test_laplacian_unwrap_recovers_the_same_wraps(phantom):
    _, field, mask = phantom
    # a phase with many wraps: 60 rad per ppm
    true_phase = field * 1500.0
    wrapped = torch.remainder(true_phase + torch.pi, 2 * torch.pi) - torch.pi
    cpu = unwrap_laplacian(wrapped, mask, VS)
    dev = unwrap_laplacian(wrapped.to(DEVICE), mask.to(DEVICE), VS)
    assert float((true_phase[mask] - true_phase[mask].mean()).abs().max()) > 20.0
    # the integer correction makes both exact unwraps of the measured phase: equal 2pi counts
    k_cpu = torch.round((cpu - wrapped) / (2 * torch.pi))[mask]
    k_dev = torch.round((dev.cpu() - wrapped) / (2 * torch.pi))[mask]
    assert torch.equal(k_cpu, k_dev)


@pytest.mark.parametrize("method", sorted(BFR_METHODS))
def test_background_removal_matches_cpu(phantom, method):
    _, local, mask = phantom
    # a background from a strong source outside the mask
    outside = torch.zeros_like(local)
    outside[2:6, 2:6, 2:6] = 5.0
    total = local + forward_field(outside, VS, B0)
    f_cpu, m_cpu = remove_background(method, total, mask, VS, B0)
    f_dev, m_dev = remove_background(method, total.to(DEVICE), mask.to(DEVICE), VS, B0)
    assert torch.equal(m_dev.cpu().bool(), m_cpu.bool())
    # TFI's 800 CG iterations (IRLS-reweighted) accumulate float32 rounding the most
    assert _rel(f_dev * m_dev, f_cpu * m_cpu) < (1e-2 if method == "tfi" else 1e-3)


@pytest.mark.parametrize("name", ["tkd", "l2", "tv"])
def test_inversions_match_cpu(phantom, name):
    chi, field, mask = phantom
    fns = {"tkd": lambda f, m: tkd(f, m, VS, B0),
           "l2": lambda f, m: closed_form_l2(f, m, VS, B0),
           "tv": lambda f, m: tv_brain_data(f, m, VS, B0, max_iter=30)}
    cpu = fns[name](field * mask, mask)
    dev = fns[name]((field * mask).to(DEVICE), mask.to(DEVICE))
    assert dev.device.type == torch.device(DEVICE).type
    # iterative TV accumulates float32 rounding differently on each device
    assert _rel(dev, cpu) < (1e-3 if name == "tv" else 1e-5)
    # and the answer is a susceptibility map, not noise (independent truth)
    assert _rel(dev * mask, chi) < 0.5


def test_network_matches_cpu(phantom):
    _, field, mask = phantom
    torch.manual_seed(1)
    net = QSMNet(channels=["local_field", "tkd", "mask"], residual_from="tkd",
                 unet={"features": [4, 8, 16], "zero_init_output": False}).eval()
    f, m = field[None, None], mask[None, None].float()
    with torch.no_grad():
        cpu = net(f, m, VS, B0)
        dev = net.to(DEVICE)(f.to(DEVICE), m.to(DEVICE), VS, B0)
    assert _rel(dev, cpu) < 1e-4


def test_end_to_end_from_phase_matches_cpu():
    pytest.importorskip("qsm_forward")
    from qsmnet.inference.options import ReconOptions
    from qsmnet.inference.pipeline import reconstruct
    from qsmnet.metrics import score
    from qsmnet.simulation.head_phantom import head_phantom
    from qsmnet.simulation.qsmforward_acquisition import simulate_acquisition, tilted_b0

    acq = simulate_acquisition(head_phantom(voxel_size_mm=(2.0, 2.0, 2.0), scale=0.6, seed=3),
                               b0_dir=tilted_b0(15.0), peak_snr=200.0, seed=5)
    sample = {"phase": acq.phase, "magnitude": acq.magnitude, "te_s": acq.te_s,
              "b0_t": acq.b0_t, "voxel_size_mm": acq.voxel_size_mm, "b0_dir": acq.b0_dir,
              "mask": acq.mask}
    cpu = reconstruct(sample, ReconOptions(method="tkd", device="cpu"))
    dev = reconstruct(sample, ReconOptions(method="tkd", device=DEVICE))
    assert dev.chi_ppm.device.type == "cpu"  # outputs always come back to the CPU
    assert torch.equal(dev.chi_mask, cpu.chi_mask)
    assert _rel(dev.total_field_ppm[cpu.mask], cpu.total_field_ppm[cpu.mask]) < 1e-3
    assert _rel(dev.chi_ppm, cpu.chi_ppm) < 1e-2
    nrmse = {name: score(r.chi_ppm.numpy(), acq.chi_ppm, acq.mask, acq.voxel_size_mm,
                         erode_mm=None)["mask"]["nrmse"] for name, r in (("cpu", cpu), ("dev", dev))}
    assert abs(nrmse["dev"] - nrmse["cpu"]) < 0.5
    assert np.isfinite(nrmse["dev"]) and nrmse["dev"] < 90.0  # TKD end to end: 77 % on the CPU


@pytest.mark.skipif(DEVICE != "cuda", reason="trainer=gpu needs CUDA")
def test_fast_dev_run_on_gpu(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qsmnet.training.train import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(root, "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=simulated_small", "data.patch_size=16", "data.batch_size=1", "data.val_size=1",
            "data.device=cuda", "model.unet.features=[4,8,16]", "module.full_metrics=false",
            "trainer=gpu", "debug=fdr", f"paths.output_dir={tmp_path}"])
    value = train(cfg)
    assert value is not None and np.isfinite(value) and 0 < value < 1000
