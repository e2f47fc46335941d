"""Training-data simulation (torch, on the fly, on any device) and a BIDS writer.

* :class:`QSMSimulator` / :func:`simulate_sample` — random training samples: brain-like masks with
  skull, scalp and air around them, spheres / ellipsoids / boxes / vessels / textures and strong
  sources inside, random B0 direction and voxel size, local and background fields, noise and an
  optional multi-echo acquisition. Ranges live in :class:`SimulationConfig`.
* :func:`write_simulated_subject` — a simulated subject written as BIDS multi-echo GRE with its
  truths under ``derivatives/qsmnet-simulation``.

The head-like evaluation phantom (:mod:`qsmnet.simulation.head_phantom`), the anatomical phantom
built from a real brain parcellation (:func:`anatomical_phantom`, needs ``qsmnet[anatomy]``) and
their qsm-forward acquisition (:mod:`qsmnet.simulation.qsmforward_acquisition`) are independent of
this simulator.
"""

from qsmnet.simulation.anatomical_phantom import anatomical_phantom
from qsmnet.simulation.bids import write_simulated_subject
from qsmnet.simulation.config import SimulationConfig, make_config
from qsmnet.simulation.sampling import derive_seed, make_generator
from qsmnet.simulation.simulator import QSMSimulator, simulate_sample

__all__ = [
    "QSMSimulator",
    "SimulationConfig",
    "anatomical_phantom",
    "derive_seed",
    "make_config",
    "make_generator",
    "simulate_sample",
    "write_simulated_subject",
]
