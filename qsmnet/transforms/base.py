"""Transform protocol: a tensor callable plus a dict twin, chained by :class:`Compose`.

Modelled on MONAI's array/dict split (ideas only):

* a transform class ``T`` is a callable on tensors (``T()(field_ppm, mask=..., ...)``) whose
  parameters are constructor arguments (so Hydra can build it from ``_target_``);
* ``T.apply(sample)`` (or the dict twin ``Td = DictTransform(T, ...)``) reads named keys from a
  sample dict, runs the tensor call and writes named keys back, leaving the rest untouched;
* :class:`Compose` chains dict transforms.

Sample-dict keys used across qsmnet (units in the names, shapes for one subject; a leading batch
axis B is allowed everywhere):

=================  ===================  ==========================================
key                shape                meaning
=================  ===================  ==========================================
``phase``          (E, X, Y, Z)         wrapped phase, rad
``magnitude``      (E, X, Y, Z)         magnitude, arbitrary units
``mask``           (X, Y, Z) bool       brain / region of interest
``te_s``           (E,)                 echo times, s
``b0_t``           float                field strength, T
``b0_dir``         (3,)                 B0 direction, array axes, unit vector
``voxel_size_mm``  (3,)                 voxel size, mm
``total_field_ppm`` (X, Y, Z)           total field, ppm
``local_field_ppm`` (X, Y, Z)           local (tissue) field, ppm
``chi_ppm``        (X, Y, Z)            susceptibility, ppm
=================  ===================  ==========================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Sample = dict[str, Any]


class Transform(ABC):
    """Base class for qsmnet transforms.

    Subclasses implement ``__call__`` on tensors and declare, for the dict twin, which sample
    keys feed which arguments (``input_keys``: argument name -> sample key) and which keys the
    outputs go to (``output_keys``: one key per returned value, in order).
    """

    input_keys: Mapping[str, str] = {}
    output_keys: Sequence[str] = ()

    @abstractmethod
    def __call__(self, *args, **kwargs):
        """Run the transform on tensors."""

    def apply(self, sample: Sample, input_keys: Mapping[str, str] | None = None,
              output_keys: Sequence[str] | None = None) -> Sample:
        """Run on a sample dict: read ``input_keys``, write ``output_keys``, return a new dict."""
        ins = dict(self.input_keys if input_keys is None else input_keys)
        outs = list(self.output_keys if output_keys is None else output_keys)
        missing = [key for key in ins.values() if key not in sample]
        if missing:
            raise KeyError(f"{type(self).__name__} needs sample keys {missing}; "
                           f"the sample has {sorted(sample)}")
        result = self(**{arg: sample[key] for arg, key in ins.items()})
        if not isinstance(result, tuple):
            result = (result,)
        if len(result) != len(outs):
            raise ValueError(f"{type(self).__name__} returned {len(result)} values for "
                             f"output keys {outs}")
        new = dict(sample)
        new.update(zip(outs, result))
        return new


class DictTransform:
    """The dict twin of a tensor transform, with keys chosen at construction.

    ``DictTransform(SomeTransform(...), input_keys={"field_ppm": "total_field_ppm"},
    output_keys=["local_field_ppm", "mask"])`` maps a sample dict to a sample dict.
    Without keys, the transform's own defaults are used.
    """

    def __init__(self, transform: Transform, input_keys: Mapping[str, str] | None = None,
                 output_keys: Sequence[str] | None = None) -> None:
        self.transform = transform
        self.input_keys = input_keys
        self.output_keys = output_keys

    def __call__(self, sample: Sample) -> Sample:
        return self.transform.apply(sample, self.input_keys, self.output_keys)

    def __repr__(self) -> str:
        return f"DictTransform({self.transform!r})"


class Compose:
    """Chain dict transforms (or plain ``dict -> dict`` callables) in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample] | Transform]) -> None:
        self.transforms = [DictTransform(t) if isinstance(t, Transform) else t for t in transforms]

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])"


class OptionalKeysTransform(Transform):
    """A transform whose dict twin passes ``optional_input_keys`` only when the sample has them
    (and they are not None); e.g. a mask that is built when absent."""

    optional_input_keys: dict[str, str] = {}

    def apply(self, sample, input_keys=None, output_keys=None):
        ins = dict(self.input_keys if input_keys is None else input_keys)
        if input_keys is None:
            for arg, key in self.optional_input_keys.items():
                if sample.get(key) is not None:
                    ins[arg] = key
        return super().apply(sample, ins, output_keys)
