"""DICOM to BIDS: multi-echo gradient-echo magnitude and phase series, through dcm2niix.

``qsmnet convert DICOM_DIR BIDS_ROOT`` runs dcm2niix (the binary on ``PATH``, else the one the
PyPI package ``dcm2niix`` installs) into a hidden temporary folder of ``BIDS_ROOT``, sorts the
images it wrote by their sidecars and moves them in as one set::

    BIDS_ROOT/sub-<id>/[ses-<s>/]anat/sub-<id>[_ses-<s>]_echo-<n>_part-{mag,phase}_MEGRE.nii.gz
                                                                          (+ .json sidecars)

which :func:`qsmnet.io.bids.read_bids_subject` (``qsmnet predict --bids``) reads. Sorting:

* magnitude or phase from the sidecar's ``ImageType`` (``P``/``PHASE`` or ``M``/``MAGNITUDE``;
  real and imaginary images are skipped);
* echoes numbered 1..E in order of ``EchoTime`` (s), which must agree with ``EchoNumber``; the
  magnitude echoes must have the phase echoes' times.

The image data, affine and sidecar are dcm2niix's, unchanged: the phase keeps its stored values
(Siemens integers, Philips scaled values) and the sidecar the keys (``Manufacturer``, Philips
scale slopes) from which the reader recognises the vendor's phase convention
(:mod:`qsmnet.io.phase`). The B0 direction comes from the affine, as for any BIDS input.
Nothing of a failed conversion stays behind (:class:`qsmnet.io.output_set.OutputSet`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from qsmnet.io.atomic import atomic_write_json
from qsmnet.io.errors import QSMInputError
from qsmnet.io.output_set import FolderLock, OutputSet, check_writable

__all__ = ["DCM2NIIX_MISSING", "ConvertedImage", "convert_dicom_to_bids", "find_dcm2niix",
           "run_convert_cli", "run_dcm2niix"]

log = logging.getLogger(__name__)

#: The message when no dcm2niix can be found.
DCM2NIIX_MISSING = ("dcm2niix not found: install it with 'pip install qsmnet[dicom]' (or 'pip "
                    "install dcm2niix'), or put a dcm2niix binary on PATH")
#: Largest difference (s) between echo times taken for the same echo (dcm2niix rounds the
#: DICOM's milliseconds to 1e-6 s or finer).
TE_MATCH_S = 1e-6
#: Longest a dcm2niix run may take, s.
DCM2NIIX_TIMEOUT_S = 3600
_TEMP_PREFIX = ".qsmnet-convert-"
_PHASE_TYPES = {"P", "PHASE"}
_MAG_TYPES = {"M", "MAGNITUDE"}
_OTHER_TYPES = {"R", "I", "REAL", "IMAGINARY"}


@dataclass
class ConvertedImage:
    """One 3-D image dcm2niix wrote: its files, sidecar, part and echo time."""

    nifti: Path
    meta: dict
    part: str          # "mag" or "phase"
    te_s: float
    echo_number: int | None


def find_dcm2niix() -> str:
    """Path of the dcm2niix binary: on ``PATH`` first, else the PyPI package's (its launcher
    beside the running interpreter, or the binary inside the package).

    Raises
    ------
    QSMInputError
        :data:`DCM2NIIX_MISSING` when neither is there.
    """
    found = shutil.which("dcm2niix")
    if found:
        return found
    # pip puts the package's launcher beside this interpreter, also when the venv is not active
    beside = Path(sys.executable).parent / "dcm2niix"
    if beside.is_file() and os.access(beside, os.X_OK):
        return os.fspath(beside)
    try:
        import dcm2niix  # the PyPI wheel ships the binary inside the package
    except ImportError:
        raise QSMInputError(DCM2NIIX_MISSING) from None
    binary = Path(getattr(dcm2niix, "bin", ""))
    if not binary.is_file():
        raise QSMInputError(DCM2NIIX_MISSING)
    return os.fspath(binary)


def run_dcm2niix(dicom_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 binary: str | None = None) -> None:
    """Convert every DICOM series under ``dicom_dir`` into gzipped NIfTI + JSON in ``out_dir``.

    Flags: ``-z y`` (gzip), ``-b y -ba y`` (BIDS sidecars, anonymised), ``-p y`` (Philips
    precise scaling, recorded in the sidecar as ``UsePhilipsFloatNotDisplayScaling``).

    Raises
    ------
    QSMInputError
        dcm2niix missing, failing (its last output lines are quoted) or timing out.
    """
    binary = binary or find_dcm2niix()
    cmd = [binary, "-z", "y", "-b", "y", "-ba", "y", "-p", "y", "-f", "%s_%e",
           "-o", os.fspath(out_dir), os.fspath(dicom_dir)]
    log.debug("running %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DCM2NIIX_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QSMInputError(f"{os.fspath(dicom_dir)}: dcm2niix could not run ({exc})") from exc
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise QSMInputError(f"{os.fspath(dicom_dir)}: dcm2niix failed (exit {done.returncode}): "
                            f"{tail}")


def _part(meta: dict, name: str) -> str | None:
    """``"phase"``, ``"mag"`` or None (real/imaginary: skipped) from the sidecar's ImageType."""
    image_type = meta.get("ImageType", [])
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    types = {str(t).upper() for t in image_type}
    if types & _PHASE_TYPES:
        return "phase"
    if types & _MAG_TYPES:
        return "mag"
    if types & _OTHER_TYPES:
        return None
    raise QSMInputError(f"{name}: ImageType {list(image_type)} says neither magnitude (M) nor "
                        "phase (P); cannot tell which this series is")


def _read_converted(folder: Path, source: str) -> list[ConvertedImage]:
    """The magnitude and phase images dcm2niix wrote in ``folder``, with their sidecars."""
    images = []
    niftis = sorted(folder.glob("*.nii.gz"))
    if not niftis:
        raise QSMInputError(f"{source}: dcm2niix found no DICOM images to convert")
    for nifti in niftis:
        sidecar = nifti.with_name(nifti.name[: -len(".nii.gz")] + ".json")
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise QSMInputError(f"{sidecar.name}: dcm2niix sidecar unreadable ({exc})") from exc
        label = f"{source} (series {meta.get('SeriesNumber', '?')}, {nifti.name})"
        part = _part(meta, label)
        if part is None:
            log.info("%s: real/imaginary image, skipped", label)
            continue
        shape = nib.load(nifti).shape
        if len(shape) != 3:
            raise QSMInputError(f"{label}: dcm2niix wrote a {len(shape)}-D image {shape}; "
                                "expected one 3-D volume per echo")
        for key in ("EchoTime", "MagneticFieldStrength"):
            if not isinstance(meta.get(key), (int, float)):
                raise QSMInputError(f"{label}: no {key} in the DICOM header")
        number = meta.get("EchoNumber")
        images.append(ConvertedImage(nifti, meta, part, float(meta["EchoTime"]),
                                     int(number) if isinstance(number, (int, float)) else None))
    return images


def _order_echoes(images: list[ConvertedImage], source: str) -> dict[str, list[ConvertedImage]]:
    """Images per part in echo order, checked: one per echo time, numbers agreeing, magnitude
    echoes matching the phase echoes."""
    parts: dict[str, list[ConvertedImage]] = {"phase": [], "mag": []}
    for image in images:
        parts[image.part].append(image)
    if not parts["phase"]:
        raise QSMInputError(f"{source}: no phase images among the DICOM series (ImageType P); "
                            "QSM needs the phase")
    for part, found in parts.items():
        found.sort(key=lambda im: im.te_s)
        for a, b in zip(found, found[1:]):
            if b.te_s - a.te_s <= TE_MATCH_S:
                raise QSMInputError(
                    f"{source}: two {part} images with echo time {1e3 * a.te_s:g} ms "
                    f"({a.nifti.name}, {b.nifti.name}): several acquisitions; put each in its "
                    "own folder and convert them one at a time")
        numbers = [im.echo_number for im in found]
        if None not in numbers and numbers != sorted(numbers):
            raise QSMInputError(f"{source}: {part} EchoNumber {numbers} does not follow the "
                                f"echo times {[im.te_s for im in found]} s")
    if parts["mag"]:
        te_phase = [im.te_s for im in parts["phase"]]
        te_mag = [im.te_s for im in parts["mag"]]
        if len(te_mag) != len(te_phase) or any(abs(a - b) > TE_MATCH_S
                                               for a, b in zip(te_mag, te_phase)):
            raise QSMInputError(f"{source}: magnitude echo times {te_mag} s do not match the "
                                f"phase echo times {te_phase} s")
    return parts


def _existing_megre(anat: Path, stem: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(stem)}_echo-[0-9]+_part-(mag|phase)_MEGRE"
                         r"\.(nii\.gz|nii|json)$")
    if not anat.is_dir():
        return []
    return sorted(f.name for f in anat.iterdir() if pattern.match(f.name))


def _label(value: str, option: str, prefix: str) -> str:
    label = value[len(prefix):] if value.startswith(prefix) else value
    if not label or not label.isalnum():
        raise QSMInputError(f"{option}: {value!r} is not a BIDS label (letters and digits)")
    return label


def _remove_stale_temp_folders(root: Path) -> None:
    """Delete the conversion folders that killed runs left in ``root`` (their pid is gone)."""
    for folder in root.glob(_TEMP_PREFIX + "*"):
        pid = folder.name[len(_TEMP_PREFIX):].split("-")[0]
        if not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _write_description(root: Path) -> None:
    """``dataset_description.json`` (BIDS requires it), unless the dataset has one."""
    path = root / "dataset_description.json"
    if not path.exists():
        atomic_write_json(path, {"Name": "qsmnet convert", "BIDSVersion": "1.9.0",
                                 "DatasetType": "raw"})


def convert_dicom_to_bids(dicom_dir: str | os.PathLike, bids_root: str | os.PathLike,
                          subject: str = "01", session: str | None = None,
                          overwrite: bool = False, binary: str | None = None) -> list[Path]:
    """Convert multi-echo GRE magnitude/phase DICOM series into one BIDS subject (session).

    Parameters
    ----------
    dicom_dir : path-like
        Folder holding the DICOM files of one acquisition (magnitude and phase series; searched
        recursively by dcm2niix).
    bids_root : path-like
        BIDS dataset folder (created when missing; ``dataset_description.json`` is added when
        it has none).
    subject, session : str
        BIDS labels (``"01"`` or ``"sub-01"``; ``session`` optional).
    overwrite : bool
        Replace this subject's (session's) existing ``*_echo-<n>_part-*_MEGRE`` files; without
        it they are refused before dcm2niix runs.
    binary : str, optional
        dcm2niix to run (default: :func:`find_dcm2niix`).

    Returns
    -------
    list of Path
        The files written (NIfTI and JSON per echo and part), in the anat folder.

    Raises
    ------
    QSMInputError
        dcm2niix missing or failing, no phase, echoes that cannot be sorted, missing echo time or
        field strength, existing outputs without ``overwrite``. Nothing is written then.
    """
    sub = _label(subject, "--subject", "sub-")
    ses = None if session is None else _label(session, "--session", "ses-")
    source = os.path.basename(os.path.normpath(os.fspath(dicom_dir))) or os.fspath(dicom_dir)
    if not Path(dicom_dir).is_dir():
        raise QSMInputError(f"{os.fspath(dicom_dir)}: DICOM folder not found")
    root = Path(bids_root)
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    existing = _existing_megre(anat, stem)
    if existing and not overwrite:
        raise QSMInputError(f"{anat / existing[0]}: exists; convert replaces a subject's MEGRE "
                            "files only with --overwrite")
    binary = binary or find_dcm2niix()
    check_writable(root, "BIDS_ROOT")
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(root)
    # in BIDS_ROOT, so that moving the images into place is a rename on one file system
    work = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=root))
    try:
        run_dcm2niix(dicom_dir, work, binary)
        parts = _order_echoes(_read_converted(work, source), source)
        with FolderLock(anat), OutputSet(anat, replaces=_existing_megre(anat, stem)) as out:
            for part, images in parts.items():
                for echo, image in enumerate(images, start=1):
                    name = f"{stem}_echo-{echo}_part-{part}_MEGRE"
                    os.replace(image.nifti, out.path(f"{name}.nii.gz"))
                    atomic_write_json(out.path(f"{name}.json"), image.meta)
            written = out.commit()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty
        raise
    shutil.rmtree(work, ignore_errors=True)
    _write_description(root)
    log.info("converted %s: %d echo(es), %s -> %s", source, len(parts["phase"]),
             "magnitude and phase" if parts["mag"] else "phase only", anat)
    return written


def run_convert_cli(args) -> int:
    """Handler of ``qsmnet convert`` (paths checked by :mod:`qsmnet.cli`)."""
    convert_dicom_to_bids(args.dicom_dir, args.bids_root, subject=args.subject,
                          session=args.session, overwrite=args.overwrite)
    return 0
