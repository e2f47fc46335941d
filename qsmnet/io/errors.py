"""The one exception type for bad user input.

Everything a user can get wrong (a missing file, a 2-D image, echo times in ms, a mask on another
grid, ...) raises :class:`QSMInputError` with a message that names the file or argument and the
problem. The CLI prints it as one ``qsmnet: error: ...`` line and exits 2, having written nothing.
"""

from __future__ import annotations

import os


class QSMInputError(ValueError):
    """Bad user input; the message names the file (or argument) and the problem.

    Subclasses :class:`ValueError` so callers that only know the standard library still catch it.

    Examples
    --------
    ``QSMInputError("sub-01_echo-2_part-phase_MEGRE.nii.gz: shape (64, 64, 40) differs from
    echo 1 (64, 64, 41)")``
    """


def display_name(path: str | os.PathLike) -> str:
    """How a file is named in messages: its base name (full paths are long and leak home dirs)."""
    return os.path.basename(os.fspath(path)) or os.fspath(path)
