"""Input/output: NIfTI, BIDS and QSM-CI readers, atomic writers, input validation.

Readers return arrays in qsmnet's layout and units (phase ``(E, X, Y, Z)`` in radians with the
echo axis first, fields in ppm, echo times in s, B0 in T, voxel sizes in mm, B0 direction as a
unit vector in array axes) and raise :class:`QSMInputError` naming the file for any bad input.
Writers are atomic: an output file appears complete or not at all.
"""

from qsmnet.io.acquisition import Acquisition
from qsmnet.io.atomic import atomic_path, atomic_write, atomic_write_json, atomic_write_text
from qsmnet.io.bids import (
    BIDS_MASK_FROM_DERIVATIVES,
    bids_derivative_path,
    find_bids_subjects,
    parse_bids_name,
    read_bids_subject,
    write_derivative_description,
)
from qsmnet.io.echoes import load_echo_series, load_mask, read_nifti_echoes
from qsmnet.io.errors import QSMInputError
from qsmnet.io.nifti import load_nifti, save_nifti
from qsmnet.io.options import reader_options
from qsmnet.io.params import AcquisitionParams, read_params_json, write_params_json
from qsmnet.io.phase import PHASE_UNITS, integer_phase_range, phase_to_radians
from qsmnet.io.qsmci import QSMCI_INPUTS, QSMCI_OUTPUT, QSMCI_STAGES, QSMCIInputs, read_qsmci_inputs
from qsmnet.io.validate import MIN_EXTENT_VOXELS, TE_MAX_S

__all__ = [
    "BIDS_MASK_FROM_DERIVATIVES",
    "MIN_EXTENT_VOXELS",
    "PHASE_UNITS",
    "QSMCI_INPUTS",
    "QSMCI_OUTPUT",
    "QSMCI_STAGES",
    "Acquisition",
    "AcquisitionParams",
    "QSMCIInputs",
    "QSMInputError",
    "TE_MAX_S",
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "bids_derivative_path",
    "find_bids_subjects",
    "integer_phase_range",
    "load_echo_series",
    "load_mask",
    "load_nifti",
    "parse_bids_name",
    "phase_to_radians",
    "read_bids_subject",
    "read_nifti_echoes",
    "read_params_json",
    "read_qsmci_inputs",
    "reader_options",
    "save_nifti",
    "write_derivative_description",
    "write_params_json",
]
