"""QSM-CI ``params.json``: acquisition parameters beside a stage's images.

Schema (``docs/conventions.md``, PyPI ``qsm-ci``)::

    {"TE": [s, ...], "B0": T, "B0_dir": [x, y, z], "voxel_size": [mm, mm, mm]}

``B0_dir`` is a unit vector in array-axis coordinates. The bfr and dipole stages do not use TE
physically; qsm-ci writes the placeholder ``[1.0]`` there, which is accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.errors import QSMInputError, display_name
from qsmnet.io.validate import TE_UNUSED_MAX_S, check_b0_dir, check_b0_t, check_te_s

__all__ = ["AcquisitionParams", "read_params_json", "write_params_json"]


@dataclass(frozen=True, eq=False)
class AcquisitionParams:
    """Validated contents of a params.json.

    Attributes
    ----------
    te_s : tuple of float or None
        Echo times, s (None when absent and not required).
    b0_t : float or None
        Field strength, T (None when absent and not required).
    b0_dir : (3,) float64 unit ndarray or None
        B0 direction, array axes; None means "take it from the affine".
    voxel_size_mm : (3,) float64 ndarray or None
        Voxel size, mm; None means "take it from the header".
    source : str
        The file read.
    """

    te_s: tuple[float, ...] | None
    b0_t: float | None
    b0_dir: np.ndarray | None
    voxel_size_mm: np.ndarray | None
    source: str


def load_json_object(path: Path, name: str, not_object: str) -> dict:
    """The JSON object in ``path``; QSMInputError ``"<name>: ..."`` when it cannot be read or
    parsed, or (with the words ``not_object``) when it holds something else than an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QSMInputError(f"{name}: cannot parse as JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise QSMInputError(f"{name}: {not_object}")
    return obj


def read_params_json(path: str | os.PathLike, require_te: bool = True,
                     require_b0: bool = True) -> AcquisitionParams:
    """Read and validate a QSM-CI params.json.

    Parameters
    ----------
    path : path-like
    require_te, require_b0 : bool
        Whether a missing ``TE`` / ``B0`` is an error (phase-consuming stages need both).

    Raises
    ------
    QSMInputError
        Missing or unparsable file, not a JSON object, missing required keys, TE not positive /
        increasing / looking like ms, B0 outside (0, 20] T, bad B0_dir or voxel_size; the message
        names the file.
    """
    p = Path(path)
    name = display_name(p)
    if not p.is_file():
        raise QSMInputError(f"{os.fspath(path)}: file not found")
    obj = load_json_object(p, name, "expected a JSON object with TE, B0, B0_dir, voxel_size")
    # a BIDS sidecar passed as params.json is the likely mistake: say which keys to use
    bids_hint = {"EchoTime": "TE", "MagneticFieldStrength": "B0"}
    hint = [f"{k} -> {v}" for k, v in bids_hint.items() if k in obj and v not in obj]
    hint_text = (f" (it has BIDS sidecar keys; params.json names them {', '.join(hint)})"
                 if hint else "")
    te = obj.get("TE")
    if te is None or (isinstance(te, list) and not te):
        if require_te:
            raise QSMInputError(f"{name}: no TE (echo times in seconds){hint_text}")
        te_s = None
    else:
        # A stage that does not use TE (qsm-ci's placeholder [1.0]) only needs it to be sane.
        te_s = check_te_s(te, f"{name} TE", **({} if require_te else {"max_s": TE_UNUSED_MAX_S}))
    b0 = obj.get("B0")
    if b0 is None:
        if require_b0:
            raise QSMInputError(f"{name}: no B0 (field strength in tesla){hint_text}")
        b0_t = None
    else:
        b0_t = check_b0_t(b0, f"{name} B0")
    b0_dir = obj.get("B0_dir")
    b0_vec = None if b0_dir is None else check_b0_dir(b0_dir, f"{name} B0_dir")
    voxel = obj.get("voxel_size")
    voxel_mm = None
    if voxel is not None:
        try:
            voxel_mm = np.asarray(voxel, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise QSMInputError(f"{name}: voxel_size {voxel!r} is not 3 numbers (mm)") from exc
        if voxel_mm.shape != (3,) or not np.all(np.isfinite(voxel_mm)) or np.any(voxel_mm <= 0):
            raise QSMInputError(f"{name}: voxel_size {voxel!r} must be 3 positive numbers (mm)")
    return AcquisitionParams(te_s=te_s, b0_t=b0_t, b0_dir=b0_vec, voxel_size_mm=voxel_mm,
                             source=os.fspath(path))


def write_params_json(path: str | os.PathLike, te_s: Sequence[float], b0_t: float,
                      b0_dir: Sequence[float], voxel_size_mm: Sequence[float]) -> Path:
    """Write a QSM-CI params.json atomically (values validated first); return the path."""
    te = check_te_s(te_s, "TE")
    b0 = check_b0_t(b0_t, "B0")
    direction = check_b0_dir(b0_dir, "B0_dir")
    voxel = [float(v) for v in voxel_size_mm]
    if len(voxel) != 3 or any(not v > 0 for v in voxel):
        raise QSMInputError(f"voxel_size {voxel} must be 3 positive numbers (mm)")
    return atomic_write_json(path, {"TE": list(te), "B0": b0, "B0_dir": direction.tolist(),
                                    "voxel_size": voxel})
