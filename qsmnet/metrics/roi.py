"""Chi statistics per region of interest: a label image on the chi map's grid -> a TSV row
per label.

``qsmnet predict --roi LABELS.nii.gz [--roi-names TABLE.tsv]`` writes, with each chi map, a
table of the mean, median and standard deviation (population, ``ddof=0``) of chi (ppm) over
each label's voxels that lie inside the chi mask; ``voxels`` counts those, and
``voxels_outside_mask`` the label's voxels left out because chi is not reported there. Label 0
is the background and gets no row; a label with no voxel inside the mask gets ``n/a`` (the
BIDS spelling of a missing value) for its statistics.

The label image must be on the chi map's grid (shape and affine), hold integers >= 0 (stored
as integers or as floats with integer values) and be 3-D. The names table is the BIDS
``dseg.tsv`` lookup table (tab-separated, a header with ``index`` and ``name`` columns) or
headerless ``index name ...`` lines such as FreeSurfer's ``FreeSurferColorLUT.txt`` (``#``
comments, whitespace-separated, further columns ignored). Labels without a name are named
``label-<index>``.

The statistics (:func:`roi_statistics`) are plain numpy; reading uses nibabel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qsmnet.io.errors import QSMInputError

__all__ = ["ROI_COLUMNS", "RoiLabels", "format_roi_tsv", "read_roi_labels", "read_roi_names",
           "roi_statistics"]

#: Columns of the TSV, in order (statistics of chi in ppm).
ROI_COLUMNS = ("index", "name", "mean_ppm", "median_ppm", "std_ppm", "voxels",
               "voxels_outside_mask")


@dataclass(frozen=True)
class RoiLabels:
    """A label image read and checked once for a run.

    Attributes
    ----------
    labels : (X, Y, Z) int64 ndarray, >= 0.
    affine : (4, 4) float64 ndarray.
    names : mapping int -> str (may be empty).
    source : str, the label file; names_source : str or None, the names table.
    """

    labels: np.ndarray
    affine: np.ndarray
    source: str
    names: Mapping[int, str] = field(default_factory=dict)
    names_source: str | None = None

    def check_grid(self, shape: Sequence[int], affine: np.ndarray, ref_name: str) -> None:
        """Refuse (QSMInputError naming the label file) a grid other than the chi map's."""
        from qsmnet.io.validate import check_same_grid

        check_same_grid(self.labels.shape, self.affine, shape, affine, f"{self.source} (--roi)",
                        f"the chi map of {ref_name}")


def read_roi_labels(path: str | os.PathLike, names_path: str | os.PathLike | None = None
                    ) -> RoiLabels:
    """Read a label image (and its names table); QSMInputError naming the file if unusable."""
    import nibabel as nib

    name = os.fspath(path)
    try:
        img = nib.load(name)
        data = np.asanyarray(img.dataobj)
        if np.issubdtype(data.dtype, np.floating) or img.dataobj.slope != 1 or \
                img.dataobj.inter != 0:
            data = np.asarray(img.get_fdata(), dtype=np.float64)
    except FileNotFoundError as exc:
        raise QSMInputError(f"{name}: label image not found (--roi)") from exc
    except Exception as exc:  # nibabel raises many kinds on a broken file
        raise QSMInputError(f"{name}: cannot read as NIfTI ({exc}) (--roi)") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise QSMInputError(f"{name}: a label image must be 3-D, got shape {data.shape} (--roi)")
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            v = data[np.nonzero(bad)][0]
            raise QSMInputError(f"{name}: labels must be integers, found {float(v):g} at "
                                f"{int(bad.sum())} voxel(s) (--roi; a probability or "
                                "resampled map is not a label image)")
    if data.size and data.min() < 0:
        raise QSMInputError(f"{name}: labels must be >= 0, found {data.min():g} (--roi)")
    labels = data.astype(np.int64)
    names = read_roi_names(names_path) if names_path is not None else {}
    return RoiLabels(labels=labels, affine=np.asarray(img.affine, dtype=np.float64),
                     source=name, names=names,
                     names_source=None if names_path is None else os.fspath(names_path))


def read_roi_names(path: str | os.PathLike) -> dict[int, str]:
    """Label names from a BIDS ``dseg.tsv`` table or ``index name ...`` lines (module docstring).

    Raises
    ------
    QSMInputError
        Unreadable file, a line without index and name, a non-integer index, a repeated index.
    """
    name = os.fspath(path)
    try:
        lines = Path(name).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QSMInputError(f"{name}: cannot read the label names ({exc}) (--roi-names)") from exc
    rows = [(n, line) for n, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]
    cols = (0, 1)
    if rows:
        first = _fields(rows[0][1])
        if first and not _is_int(first[0]) or "index" in first:
            if "index" not in first or "name" not in first:
                raise QSMInputError(f"{name}: line {rows[0][0]}: a header must name the 'index' "
                                    "and 'name' columns (--roi-names)")
            cols = (first.index("index"), first.index("name"))
            rows = rows[1:]
    names: dict[int, str] = {}
    for n, line in rows:
        parts = _fields(line)
        if len(parts) <= max(cols) or not _is_int(parts[cols[0]]):
            raise QSMInputError(f"{name}: line {n}: expected an integer index and a name, got "
                                f"{line.strip()!r} (--roi-names)")
        index = int(parts[cols[0]])
        if index in names:
            raise QSMInputError(f"{name}: line {n}: index {index} is named twice (--roi-names)")
        names[index] = parts[cols[1]]
    return names


def _fields(line: str) -> list[str]:
    return [f.strip() for f in line.split("\t")] if "\t" in line else line.split()


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def roi_statistics(chi_ppm: np.ndarray, chi_mask: np.ndarray, labels: np.ndarray,
                   names: Mapping[int, str] | None = None) -> list[dict[str, object]]:
    """Mean, median, std (``ddof=0``) and voxel counts of chi per label, inside ``chi_mask``.

    Parameters
    ----------
    chi_ppm : (X, Y, Z) float array, ppm.
    chi_mask : (X, Y, Z) bool array, where chi is reported.
    labels : (X, Y, Z) int array, >= 0 (0: background, no row).
    names : mapping int -> str, optional.

    Returns
    -------
    list of dict
        One per label present in ``labels`` (ascending), keys :data:`ROI_COLUMNS`; statistics
        are float64 (NaN where the label has no voxel in the mask).
    """
    chi = np.asarray(chi_ppm, dtype=np.float64)
    mask = np.asarray(chi_mask, dtype=bool)
    lab = np.asarray(labels)
    if not (chi.shape == mask.shape == lab.shape):
        raise ValueError(f"shapes differ: chi {chi.shape}, mask {mask.shape}, labels {lab.shape}")
    names = names or {}
    rows = []
    for index in np.unique(lab[lab > 0]):
        in_label = lab == index
        values = chi[in_label & mask]
        n = int(values.size)
        stats = (float(values.mean()), float(np.median(values)), float(values.std())) if n \
            else (math.nan, math.nan, math.nan)
        rows.append({"index": int(index), "name": names.get(int(index), f"label-{int(index)}"),
                     "mean_ppm": stats[0], "median_ppm": stats[1], "std_ppm": stats[2],
                     "voxels": n, "voxels_outside_mask": int(in_label.sum()) - n})
    return rows


def format_roi_tsv(rows: Sequence[Mapping[str, object]]) -> str:
    """The TSV text of :func:`roi_statistics` rows (header :data:`ROI_COLUMNS`; floats with 9
    significant digits, NaN as ``n/a``)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.9g}"
        return str(v).replace("\t", " ")

    lines = ["\t".join(ROI_COLUMNS)]
    lines += ["\t".join(cell(r[c]) for c in ROI_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"
