"""Where trained networks live and how they load: the shipped model, release files, checkpoints.

Two on-disk forms:

* a **release file** (``.pt``): ``{"format": "qsmnet-model/1", "config": QSMNet config,
  "state_dict": ..., "metadata": {...}}`` — plain tensors and dicts, read with
  ``torch.load(weights_only=True)``; the shipped model is one (``qsmnet/weights/``);
* a **Lightning checkpoint** (``.ckpt``) written by ``scripts/train.py``.

Nothing is downloaded: the shipped weights are part of the package.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from qsmnet.io.atomic import atomic_path, atomic_write_json
from qsmnet.io.errors import QSMInputError
from qsmnet.models.qsm_net import CHECKPOINT_CONFIG_KEY, QSMNet

RELEASE_FORMAT = "qsmnet-model/1"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: The model loaded by ``--method unet``.
SHIPPED_MODEL = WEIGHTS_DIR / "qsmnet_default.pt"


def save_release(net: QSMNet, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                 half: bool = False) -> Path:
    """Write ``net`` as a release file (atomically), float16 weights with ``half``; a JSON
    copy of the config and metadata is written beside it (``.json``)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu().contiguous()
             for k, v in net.state_dict().items()}
    payload = {"format": RELEASE_FORMAT, "config": net.get_config(), "state_dict": state,
               "metadata": dict(metadata or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_json(Path(path).with_suffix(".json"),
                      {"format": RELEASE_FORMAT, "config": payload["config"],
                       "metadata": payload["metadata"]})
    return Path(path)


def load_release(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                 ) -> tuple[QSMNet, dict[str, Any]]:
    """Load a release file; returns ``(net in eval mode, metadata)``."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != RELEASE_FORMAT:
        raise QSMInputError(f"{Path(path).name}: not a qsmnet model file ({RELEASE_FORMAT})")
    net = QSMNet.from_config(payload["config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    net.load_state_dict(state)
    return net.eval(), dict(payload.get("metadata", {}))


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, pickle.UnpicklingError):
        # weights-only loading met something other than tensors and plain containers
        return ("it holds Python objects besides tensors and plain values; refused, since "
                "loading them could run arbitrary code")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a training checkpoint (``.ckpt``) written by ``scripts/train.py``.

    Loaded with ``torch.load(weights_only=True)``: a file holding arbitrary pickled objects is
    refused, not executed.

    Raises
    ------
    QSMInputError
        Missing file, a file torch cannot load (corrupt, foreign, a crafted pickle), a release
        file (``.pt``, which holds weights for inference, not a training state) or any other
        dict without the network config and weights; the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise QSMInputError(f"{p}: no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle errors for a corrupt, foreign or unsafe file
        raise QSMInputError(f"{p.name}: cannot load a qsmnet checkpoint "
                            f"({_first_line(exc)})") from exc
    if isinstance(ckpt, dict) and ckpt.get("format") == RELEASE_FORMAT:
        raise QSMInputError(f"{p.name}: a qsmnet model release file, not a training checkpoint "
                            "(start a new run from it with init_from=)")
    if not isinstance(ckpt, dict) or CHECKPOINT_CONFIG_KEY not in ckpt or "state_dict" not in ckpt:
        raise QSMInputError(f"{p.name}: not a qsmnet training checkpoint (no network config "
                            f"'{CHECKPOINT_CONFIG_KEY}' and weights)")
    return ckpt


def load_network(spec: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[QSMNet, dict[str, Any]]:
    """Load ``"unet"`` (the shipped model), a release ``.pt`` or a training ``.ckpt``.

    Raises QSMInputError naming the file when it is missing or not a qsmnet model.
    """
    path = SHIPPED_MODEL if str(spec) == "unet" else Path(spec)
    if not path.is_file():
        if str(spec) == "unet":
            raise QSMInputError(f"{path}: the shipped model is missing from this installation; "
                                "reinstall qsmnet or pass --method CHECKPOINT")
        raise QSMInputError(f"{path}: no such model file")
    try:
        if path.suffix == ".ckpt":
            net = QSMNet.from_checkpoint_dict(read_checkpoint(path))
            meta: dict[str, Any] = {"source": str(path)}
        else:
            net, meta = load_release(path, map_location="cpu")
    except QSMInputError:
        raise
    except Exception as exc:  # torch/pickle errors for a corrupt or foreign file
        raise QSMInputError(f"{path.name}: cannot load a qsmnet model ({_first_line(exc)})") \
            from exc
    meta.setdefault("source", str(path))
    return net.to(device).eval(), meta
