"""BIDS multi-echo GRE: find subjects, read their acquisitions, name derivative outputs.

Layout read (BIDS 1.9, ``anat`` MEGRE)::

    ROOT/sub-<id>/[ses-<s>/]anat/
        sub-<id>[_ses-<s>][_acq-<a>][_run-<r>]_echo-<n>_part-{phase,mag}_MEGRE.nii[.gz]
        sub-<id>[_ses-<s>][_acq-<a>][_run-<r>]_echo-<n>_part-{phase,mag}_MEGRE.json

Files are grouped into acquisitions by all entities except ``echo`` and ``part``; echoes are
ordered by their number (``echo-10`` after ``echo-2``). Each echo's JSON sidecar (with BIDS
inheritance from higher folders) gives ``EchoTime`` (s) and ``MagneticFieldStrength`` (T); a
``B0_dir`` key (written e.g. by qsm-forward) gives the B0 direction, otherwise the affine does.
Outputs go to ``ROOT/derivatives/qsmnet/sub-<id>/[ses-<s>/]anat/<entities>_<suffix>.nii.gz``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from qsmnet.io.acquisition import Acquisition
from qsmnet.io.atomic import atomic_write_json, atomic_write_text
from qsmnet.io.echoes import load_echo_series, load_mask, resolve_b0_dir, series_name
from qsmnet.io.errors import QSMInputError
from qsmnet.io.params import load_json_object
from qsmnet.io.phase import nifti_stored_scaling, phase_sign_from_sidecar, sidecar_phase_rescale
from qsmnet.io.validate import (
    check_b0_t,
    check_magnitude_decay,
    check_same_grid,
    check_te_s,
    voxel_size_from_header,
)

__all__ = [
    "BIDSIGNORE_PATTERNS",
    "BIDS_MASK_FROM_DERIVATIVES",
    "bids_derivative_path",
    "find_bids_subjects",
    "parse_bids_name",
    "read_bids_subject",
    "write_derivative_description",
]

#: Pass as ``mask_path`` to :func:`read_bids_subject` to use a mask found under
#: ``ROOT/derivatives/*/sub-<id>/[ses-*/]anat/*_mask.nii[.gz]``.
BIDS_MASK_FROM_DERIVATIVES = "derivatives"

_EXTENSIONS = (".nii.gz", ".nii", ".json")
_ENTITY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")
_SUFFIX = re.compile(r"^[a-zA-Z0-9]+$")
# Entities that describe a derivative file rather than the acquisition it belongs to.
_DERIVATIVE_ONLY = {"desc", "space", "label", "res", "den", "echo", "part"}


def parse_bids_name(filename: str) -> tuple[dict[str, str], str, str] | None:
    """Split a BIDS file name into (entities, suffix, extension); None if it is not one.

    >>> parse_bids_name("sub-01_acq-x_echo-2_part-phase_MEGRE.nii.gz")
    ({'sub': '01', 'acq': 'x', 'echo': '2', 'part': 'phase'}, 'MEGRE', '.nii.gz')
    """
    for ext in _EXTENSIONS:
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            break
    else:
        return None
    *pairs, suffix = stem.split("_")
    if not _SUFFIX.match(suffix):
        return None
    entities: dict[str, str] = {}
    for pair in pairs:
        m = _ENTITY.match(pair)
        if m is None or m.group(1) in entities:
            return None
        entities[m.group(1)] = m.group(2)
    return entities, suffix, ext


def _subject_id(subject: str) -> str:
    sub = subject[4:] if subject.startswith("sub-") else subject
    if not sub or not sub.isalnum():
        raise QSMInputError(f"--subject: {subject!r} is not a BIDS subject label "
                            "(e.g. 01 or sub-01)")
    return sub


def _check_root(root: str | os.PathLike) -> Path:
    r = Path(root)
    if not r.is_dir():
        raise QSMInputError(f"{os.fspath(root)}: BIDS folder not found")
    return r


def _anat_dirs(subject_dir: Path) -> list[Path]:
    dirs = [subject_dir / "anat"] + sorted(d / "anat" for d in subject_dir.glob("ses-*"))
    return [d for d in dirs if d.is_dir()]


def _megre_phase_files(subject_dir: Path) -> list[Path]:
    files = []
    for d in _anat_dirs(subject_dir):
        files += [f for f in d.iterdir() if "_part-phase" in f.name
                  and f.name.endswith(("_MEGRE.nii", "_MEGRE.nii.gz"))]
    return sorted(files)


def find_bids_subjects(root: str | os.PathLike) -> list[str]:
    """Subject labels (without ``sub-``) that have multi-echo GRE phase under ``root``, sorted.

    Raises QSMInputError if ``root`` is not a folder; returns ``[]`` when no subject qualifies.
    """
    r = _check_root(root)
    subs = [d.name[4:] for d in sorted(r.glob("sub-*"))
            if d.is_dir() and _megre_phase_files(d)]
    return subs


def _sidecar(nifti: Path, root: Path, entities: dict[str, str], suffix: str) -> dict:
    """The JSON metadata of ``nifti`` by the BIDS inheritance principle.

    Sidecars whose entities are a subset of the image's apply; those in higher folders and with
    fewer entities are applied first, so the most specific one (the image's own) wins.
    """
    levels = [root, root / f"sub-{entities['sub']}"]
    if "ses" in entities:
        levels.append(levels[-1] / f"ses-{entities['ses']}")
    levels.append(nifti.parent)
    merged: dict = {}
    seen: set[Path] = set()
    for level in levels:
        if not level.is_dir() or level in seen:
            continue
        seen.add(level)
        found = []
        for f in level.glob(f"*{suffix}.json"):
            parsed = parse_bids_name(f.name)
            if parsed is None or parsed[1] != suffix:
                continue
            ents = parsed[0]
            if all(entities.get(k) == v for k, v in ents.items()):
                found.append((len(ents), f))
        for _, f in sorted(found):
            merged.update(load_json_object(f, f.name, "sidecar is not a JSON object"))
    return merged


def _json_name(nifti: Path) -> str:
    name = nifti.name
    return name[: -len(".nii.gz")] + ".json" if name.endswith(".nii.gz") else \
        name[: -len(".nii")] + ".json"


def _group_files(subject_dir: Path, sub: str) -> dict[tuple, dict[str, dict[int, Path]]]:
    """MEGRE files by acquisition key (entities but echo/part) -> part -> echo number -> path."""
    groups: dict[tuple, dict[str, dict[int, Path]]] = {}
    for d in _anat_dirs(subject_dir):
        for f in sorted(d.iterdir()):
            parsed = parse_bids_name(f.name)
            if parsed is None or parsed[1] != "MEGRE" or parsed[2] == ".json":
                continue
            ents = parsed[0]
            if ents.get("sub") != sub or ents.get("part") not in ("phase", "mag"):
                continue
            if "echo" not in ents:
                raise QSMInputError(f"{f.name}: MEGRE file has no echo-<n> entity")
            try:
                echo = int(ents["echo"])
            except ValueError as exc:
                raise QSMInputError(f"{f.name}: echo-{ents['echo']} is not an echo number") from exc
            key = tuple((k, v) for k, v in ents.items() if k not in ("echo", "part"))
            part = groups.setdefault(key, {"phase": {}, "mag": {}})[ents["part"]]
            if echo in part:
                raise QSMInputError(f"{f.name}: echo {echo} also in {part[echo].name}")
            part[echo] = f
    return groups


def _find_derivative_mask(root: Path, entities: dict[str, str], name: str) -> Path:
    """The mask of acquisition ``entities`` under ``root/derivatives/*``; most specific wins."""
    sub_dir = f"sub-{entities['sub']}"
    anat = Path(sub_dir, f"ses-{entities['ses']}", "anat") if "ses" in entities \
        else Path(sub_dir, "anat")
    candidates = []
    for pipeline in sorted((root / "derivatives").glob("*")):
        folder = pipeline / anat
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*_mask.nii*")):
            parsed = parse_bids_name(f.name)
            if parsed is None or parsed[1] != "mask" or parsed[2] == ".json":
                continue
            ents = {k: v for k, v in parsed[0].items() if k not in _DERIVATIVE_ONLY}
            if all(entities.get(k) == v for k, v in ents.items()):
                candidates.append((len(ents), f))
    if not candidates:
        raise QSMInputError(f"{name}: no mask found under "
                            f"{root / 'derivatives' / '*' / anat / '*_mask.nii[.gz]'}")
    best = max(n for n, _ in candidates)
    top = [f for n, f in candidates if n == best]
    if len(top) > 1:
        raise QSMInputError(f"{name}: several masks match ({', '.join(str(f) for f in top)}); "
                            "pass the one to use with --mask")
    return top[0]


def _read_group(root: Path, key: tuple, files: dict[str, dict[int, Path]],
                mask_path, phase_sign: int | None, phase_units: str, mask_threshold: float | None,
                decay_check: bool, min_extent: int, require_background: bool) -> Acquisition:
    entities = dict(key)
    name = "_".join(f"{k}-{v}" for k, v in key)
    echoes = sorted(files["phase"])
    phase_paths = [files["phase"][e] for e in echoes]
    mags = files["mag"]
    if mags and sorted(mags) != echoes:
        raise QSMInputError(f"{name}: magnitude echoes {sorted(mags)} do not match phase echoes "
                            f"{echoes}")
    te_list: list[float] = []
    b0_values: list[tuple[float, str]] = []
    b0_dir = None
    rescales: list[tuple[float, float]] = []  # vendor phase scaling per echo (Philips)
    metas: list[tuple[dict, str]] = []
    for e, path in zip(echoes, phase_paths):
        meta = _sidecar(path, root, dict(entities, echo=str(e), part="phase"), "MEGRE")
        if mags and ("EchoTime" not in meta or "MagneticFieldStrength" not in meta):
            mag_meta = _sidecar(mags[e], root, dict(entities, echo=str(e), part="mag"), "MEGRE")
            meta = {**mag_meta, **meta}
        sidecar = _json_name(path)
        stored = nifti_stored_scaling(path) if "PhilipsRescaleSlope" in meta else None
        rescales.append(sidecar_phase_rescale(meta, sidecar, stored)[0])
        metas.append((meta, sidecar))
        if "EchoTime" not in meta:
            raise QSMInputError(f"{sidecar}: no EchoTime (s) in the JSON sidecar of "
                                f"{path.name}")
        te_list.append(check_te_s(meta["EchoTime"], sidecar)[0])
        if "MagneticFieldStrength" not in meta:
            raise QSMInputError(f"{sidecar}: no MagneticFieldStrength (T) in the JSON sidecar of "
                                f"{path.name}")
        b0_values.append((check_b0_t(meta["MagneticFieldStrength"], sidecar), sidecar))
        if b0_dir is None and meta.get("B0_dir") is not None:
            b0_dir = (meta["B0_dir"], sidecar)
    te = check_te_s(te_list, f"{name} (EchoTime of echoes {echoes})")
    b0, first_sidecar = b0_values[0]
    for value, sidecar in b0_values[1:]:
        if abs(value - b0) > 1e-6 * b0:
            raise QSMInputError(f"{sidecar}: MagneticFieldStrength {value:g} T differs from "
                                f"{first_sidecar} ({b0:g} T)")
    phase = load_echo_series(phase_paths, "phase", phase_units, min_extent,
                             phase_rescale=rescales,
                             phase_mrad=any("PhilipsRescaleSlope" in m for m, _ in metas))
    phase_sign = phase_sign_from_sidecar(*metas[0], phase_sign)[0]
    first = phase_paths[0].name
    magnitude = None
    mag_paths = [mags[e] for e in echoes] if mags else []
    if mags:
        mag = load_echo_series(mag_paths, "magnitude")
        check_same_grid(mag.data.shape[1:], mag.affine, phase.data.shape[1:], phase.affine,
                        mags[echoes[0]].name, f"phase ({first})")
        magnitude = mag.data
    mask = None
    if mask_path is not None:
        if os.fspath(mask_path) == BIDS_MASK_FROM_DERIVATIVES:
            mask_path = _find_derivative_mask(root, entities, name)
        mask = load_mask(mask_path, phase.data.shape[1:], phase.affine, f"phase ({first})",
                         mask_threshold, require_background)
    if magnitude is not None and decay_check:
        check_magnitude_decay(magnitude, te, series_name(mag_paths), mask)
    direction = resolve_b0_dir(b0_dir[0] if b0_dir else None, phase.affine,
                               f"{b0_dir[1]} B0_dir" if b0_dir else first)
    return Acquisition(
        phase=phase.data, magnitude=magnitude, mask=mask, te_s=te, b0_t=b0, b0_dir=direction,
        voxel_size_mm=voxel_size_from_header(phase.header, first), affine=phase.affine,
        header=phase.header, source=os.fspath(phase_paths[0].parent), name=name,
        phase_sign=phase_sign, entities=entities)


def read_bids_subject(root: str | os.PathLike, subject: str,
                      mask_path: str | os.PathLike | None = None,
                      phase_sign: int | None = None, phase_units: str = "auto",
                      mask_threshold: float | None = None, decay_check: bool = True,
                      min_extent: int = 2, require_background: bool = False
                      ) -> list[Acquisition]:
    """Read every multi-echo GRE acquisition of one subject.

    Parameters
    ----------
    root : path-like
        BIDS dataset folder.
    subject : str
        ``"01"`` or ``"sub-01"``.
    mask_path : path-like, optional
        None (default): no mask. A path: that mask (must match the grid of every acquisition).
        :data:`BIDS_MASK_FROM_DERIVATIVES` (``"derivatives"``): the most specific
        ``derivatives/*/sub-<id>/[ses-*/]anat/*_mask.nii[.gz]`` whose entities match.
    phase_sign : {1, -1} or None
        Vendor polarity (see :class:`~qsmnet.io.acquisition.Acquisition`). None (the default,
        ``--phase-sign`` not given): from the sidecar's ``Manufacturer``, -1 for GE, else +1
        (:func:`~qsmnet.io.phase.phase_sign_from_sidecar`). Philips phase saved with dcm2niix's
        precise scaling is scaled back to its display values (mrad) before its units are
        recognised (:func:`~qsmnet.io.phase.sidecar_phase_rescale`).
    phase_units, mask_threshold, decay_check, min_extent, require_background
        As for :func:`~qsmnet.io.echoes.read_nifti_echoes` (``--phase-units``,
        ``--mask-threshold``, ``--no-decay-check``; the CLI passes the minimum extent and
        requires background in the mask).

    Returns
    -------
    list of Acquisition
        One per entity group (session, acq, run, ...), sorted by name.

    Raises
    ------
    QSMInputError
        Missing subject or files, missing/invalid EchoTime or MagneticFieldStrength, echoes on
        different grids, bad mask, ...; the message names the file.
    """
    r = _check_root(root)
    sub = _subject_id(subject)
    if phase_sign not in (1, -1, None):
        raise QSMInputError(f"--phase-sign: must be 1 or -1, got {phase_sign!r}")
    subject_dir = r / f"sub-{sub}"
    if not subject_dir.is_dir():
        raise QSMInputError(f"sub-{sub}: subject folder not found in {os.fspath(root)}")
    groups = _group_files(subject_dir, sub)
    groups = {k: v for k, v in groups.items() if v["phase"] or v["mag"]}
    if not any(v["phase"] for v in groups.values()):
        raise QSMInputError(f"sub-{sub}: no *_echo-<n>_part-phase_MEGRE.nii[.gz] files in "
                            f"{subject_dir}/[ses-*/]anat")
    acquisitions = []
    for key in sorted(groups):
        files = groups[key]
        if not files["phase"]:
            continue  # magnitude-only series (no phase): nothing for QSM
        acquisitions.append(_read_group(r, key, files, mask_path, phase_sign, phase_units,
                                        mask_threshold, decay_check, min_extent,
                                        require_background))
    return acquisitions


def bids_derivative_path(root: str | os.PathLike | None, acquisition: Acquisition, suffix: str,
                         out_root: str | os.PathLike | None = None) -> Path:
    """Where a derivative map of ``acquisition`` goes.

    Parameters
    ----------
    root : path-like or None
        BIDS dataset folder; the default derivative folder is ``root/derivatives/qsmnet``.
    acquisition : Acquisition
        Its BIDS entities (or, failing that, its name ``sub-01_acq-x``) name the file.
    suffix : str
        BIDS suffix, e.g. ``"Chimap"``; alphanumeric.
    out_root : path-like, optional
        Derivative folder to use instead of ``root/derivatives/qsmnet``.

    Returns
    -------
    Path
        ``<deriv>/sub-<id>/[ses-<s>/]anat/<entities>_<suffix>.nii.gz``.
    """
    if not _SUFFIX.match(suffix):
        raise ValueError(f"BIDS suffix must be alphanumeric, got {suffix!r}")
    if out_root is None:
        if root is None:
            raise ValueError("give the BIDS root or out_root")
        out_root = Path(root) / "derivatives" / "qsmnet"
    entities = dict(acquisition.entities)
    if not entities:
        parsed = parse_bids_name(acquisition.name + "_x.json")
        entities = parsed[0] if parsed else {}
    if "sub" not in entities:
        raise ValueError(f"acquisition {acquisition.name!r} has no BIDS subject entity")
    folder = Path(out_root) / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    stem = "_".join(f"{k}-{v}" for k, v in entities.items() if k not in ("echo", "part"))
    return folder / "anat" / f"{stem}_{suffix}.nii.gz"


#: Files qsmnet writes into a derivative dataset that BIDS has no name for (a field map in
#: ``anat`` in ppm, the ROI statistics tables, PNG previews, the BIDS-App's summary and logs):
#: listed in its ``.bidsignore`` so that the BIDS validator checks everything else.
BIDSIGNORE_PATTERNS = ("*_fieldmap.nii.gz", "*_fieldmap.json", "*_stats.tsv", "*_stats.json",
                       "*_Chimap.png", "qsmnet_summary.tsv", "logs/")

_DERIVATIVE_README = """# qsmnet susceptibility maps

Quantitative susceptibility maps (`*_Chimap.nii.gz`, chi in ppm) reconstructed by qsmnet from
multi-echo gradient-echo phase, with the total and local field maps (ppm), the masks they are
reported on and one JSON record per chi map (its sidecar: inputs, method, parameters,
reference, timings). Files BIDS has no name for are listed in `.bidsignore`.
"""


def write_derivative_description(deriv_root: str | os.PathLike,
                                 source_datasets: Sequence[str] = (),
                                 raw_root: str | os.PathLike | None = None) -> Path:
    """Write ``dataset_description.json`` of a qsmnet derivative folder if it is missing.

    BIDS requires it for a derivative dataset (``Name``, ``BIDSVersion``, ``DatasetType``
    ``derivative``, ``GeneratedBy``); validators and BIDS apps refuse the folder otherwise.
    ``raw_root``: the raw dataset, linked as ``DatasetLinks.raw`` (a path relative to the
    derivative folder), the dataset that ``bids:raw:`` URIs in the sidecars' ``Sources`` name.
    An existing file is left alone (it may have been written by the user). A missing
    ``README.md`` is written, and ``.bidsignore`` gets the patterns of
    :data:`BIDSIGNORE_PATTERNS` it lacks.
    """
    from qsmnet import __version__

    root = Path(deriv_root)
    _update_bidsignore(root)
    if not any((root / n).exists() for n in ("README", "README.md", "README.rst", "README.txt")):
        atomic_write_text(root / "README.md", _DERIVATIVE_README)
    path = root / "dataset_description.json"
    if path.exists():
        return path
    description: dict = {
        "Name": "qsmnet susceptibility maps",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmnet", "Version": __version__}],
    }
    if source_datasets:
        description["SourceDatasets"] = [{"URL": s} for s in source_datasets]
    if raw_root is not None:
        link = os.path.relpath(Path(raw_root).resolve(), root.resolve())
        description["DatasetLinks"] = {"raw": Path(link).as_posix()}
    return atomic_write_json(path, description)


def _update_bidsignore(root: Path) -> Path:
    path = root / ".bidsignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    missing = [p for p in BIDSIGNORE_PATTERNS if p not in lines]
    if missing:
        atomic_write_text(path, "\n".join([*lines, *missing]) + "\n")
    return path
