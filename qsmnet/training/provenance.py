"""Where a trained network came from: the chain of training runs behind a checkpoint or release.

A *stage* is one run of ``scripts/train.py``::

    {"seed": int | None, "global_step": int | None, "overrides": [str, ...] | None,
     "name": str}                               # "name" only for a stage that became a release

``overrides`` are the run's Hydra command-line overrides, made portable (paths inside the
repository relative to it, scratch paths elsewhere left out, ``ckpt_path=`` dropped: resuming
continues the same stage). A *lineage* is a list of stages, oldest first. A run started with
``init_from=`` has the lineage of its source followed by its own stage, so a fine-tune of a
fine-tune can be reproduced from scratch even after the release it started from was replaced.

Training checkpoints carry their lineage under :data:`LINEAGE_KEY`; release files under the
metadata key ``"lineage"`` (``scripts/export_model.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

LINEAGE_KEY = "qsmnet_lineage"
ROOT = Path(__file__).resolve().parents[2]
_DROPPED = ("ckpt_path",)
#: the ``init_from=`` value of a stage whose source was a file outside the repository
PREVIOUS = "<the previous run's last.ckpt>"


def portable_overrides(overrides: Iterable[str] | None, root: Path = ROOT) -> list[str] | None:
    """``overrides`` as a command anyone can run from the repository root ``root``.

    A value that is an absolute path inside ``root`` is made relative to it; an override whose
    value is an absolute path elsewhere (a scratch directory of the training machine) is left
    out, so the run falls back to that setting's default, except ``init_from=``, which becomes
    :data:`PREVIOUS` (leaving it out would train from scratch; the lineage's previous stage is
    what it names). ``ckpt_path=`` (resume) is left out.
    """
    if overrides is None:
        return None
    out = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if key.lstrip("+~") in _DROPPED:
            continue
        if sep and value.startswith("/"):
            try:
                value = Path(value).resolve().relative_to(root.resolve()).as_posix() or "."
            except ValueError:
                if key.lstrip("+~") == "init_from":
                    out.append(f"{key}={PREVIOUS}")
                continue
            item = f"{key}={value}"
        out.append(item)
    return out


def run_overrides() -> list[str] | None:
    """The command-line overrides of the running Hydra job (None outside ``@hydra.main``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # pragma: no cover - hydra-core is a dependency
        return None
    return None


def stage(overrides: Iterable[str] | None, seed: Any, global_step: int | None = None,
          name: str | None = None) -> dict[str, Any]:
    """One training run as a lineage entry (see the module docstring)."""
    out: dict[str, Any] = {"seed": None if seed is None else int(seed),
                           "global_step": None if global_step is None else int(global_step),
                           "overrides": portable_overrides(overrides)}
    if name:
        out["name"] = str(name)
    return out


def _init_from(overrides: Iterable[str] | None) -> str | None:
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        if sep and key.lstrip("+~") == "init_from" and value not in ("", "null"):
            return value
    return None


def _resolve(spec: str) -> str:
    """``init_from`` values are relative to the repository root the run was started from."""
    if spec == "unet" or os.path.isabs(spec):
        return spec
    return str(ROOT / spec)


def release_lineage(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The lineage of a release from its metadata; a release written before lineages were
    recorded is one stage built from its training overrides, seed and steps."""
    if metadata.get("lineage"):
        return [dict(s) for s in metadata["lineage"]]
    return [stage(metadata.get("train_overrides"), metadata.get("seed"),
                  metadata.get("global_step"), metadata.get("name"))]


def run_lineage(run_dir: Path, global_step: int | None) -> list[dict[str, Any]]:
    """The lineage of a run from its Hydra directory (``run_dir/.hydra``), for checkpoints
    written before lineages were recorded; the source of ``init_from=`` is followed."""
    hydra_dir = Path(run_dir) / ".hydra"
    overrides_file, config_file = hydra_dir / "overrides.yaml", hydra_dir / "config.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    own = stage(overrides, (config or {}).get("seed"), global_step)
    source = _init_from(overrides)
    return [*lineage_of(_resolve(source)), own] if source else [own]


def checkpoint_lineage(ckpt: dict[str, Any], path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lineage of a training checkpoint already read from ``path`` (its record, or rebuilt
    from the run's ``.hydra`` directory, ``path/../..``, when it has none)."""
    if ckpt.get(LINEAGE_KEY):
        return [dict(s) for s in ckpt[LINEAGE_KEY]]
    return run_lineage(Path(path).resolve().parents[1], ckpt.get("global_step"))


def lineage_of(spec: str | os.PathLike) -> list[dict[str, Any]]:
    """The lineage of ``"unet"`` (the shipped model), a release ``.pt`` or a training ``.ckpt``.

    Raises QSMInputError naming the file when it is missing or not a qsmnet model.
    """
    from qsmnet.inference.model_store import SHIPPED_MODEL, load_network, read_checkpoint

    path = SHIPPED_MODEL if str(spec) == "unet" else Path(spec)
    if path.suffix == ".ckpt":
        return checkpoint_lineage(read_checkpoint(path), path)
    _, metadata = load_network(path)
    return release_lineage(metadata)


def commands(lineage: list[dict[str, Any]]) -> list[str]:
    """One ``python scripts/train.py ...`` command per stage (``"(overrides not recorded)"``
    where a stage's overrides are unknown)."""
    return ["python scripts/train.py " + " ".join(s["overrides"]) if s.get("overrides") is not None
            else "(overrides not recorded)" for s in lineage]
