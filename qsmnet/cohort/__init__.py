"""``qsmnet BIDS_DIR OUTPUT_DIR participant``: a whole study, one ``qsmnet predict`` per subject.

The BIDS-App form of the command line (Gorgolewski et al. 2017, "BIDS Apps"): every participant
of ``BIDS_DIR`` (or those named by ``--participant-label``) is reconstructed into the derivative
folder ``OUTPUT_DIR`` (``OUTPUT_DIR/sub-<id>/[ses-<s>/]anat/...`` and
``dataset_description.json``), the very files ``qsmnet predict --bids BIDS_DIR --subject <id>
--out OUTPUT_DIR`` writes, because that is what runs for each subject: a fresh
``python -m qsmnet predict ...`` process per subject, with every option this command does not
know passed on unchanged. So a subject inherits all of ``predict``'s input checks, whole output
sets and folder locks, a crash or an out-of-memory kill of one subject cannot take the others
down, its memory is returned when it ends, and its torch/OpenMP thread count is set from the
environment before torch starts.

Runs are resumable: a subject is *done* when, for every acquisition (group of echoes) of its
input, the JSON record of the chi map (which ``predict`` writes last) exists and names files
that all exist; done subjects are skipped (``--overwrite`` redoes them). A subject with only
part of its outputs (a run killed between two of its acquisitions) is rerun with
``--overwrite``, which replaces the sets it left.

Subjects run one at a time (``--jobs 1``), ``--jobs N`` at a time on this machine (a thread
pool of ``concurrent.futures``, each thread waiting on its subject's process), or as tasks of a
Dask distributed cluster (``--dask-scheduler ADDRESS``: a ``distributed.LocalCluster``, a
``dask_jobqueue.SLURMCluster``/``PBSCluster``, ...); paths must then be visible to the workers
(a shared file system). Each subject's torch uses ``--threads-per-subject`` threads: by
default the machine's cores divided by ``--jobs`` locally, and 1 on Dask, where a worker's
thread count is the number of cores it owns.

After each subject, ``OUTPUT_DIR/qsmnet_summary.tsv`` is rewritten atomically with one row per
subject: ``done``, ``skipped`` (done before this run), ``failed`` (with ``predict``'s one-line
error) or ``pending``, and the subject's wall time (s). Each subject's output (progress, log
lines, errors) is kept in ``OUTPUT_DIR/logs/sub-<id>_predict.log``. The exit code is 0 when no
subject failed and 1 otherwise; bad arguments stop everything with exit code 2 before any
subject starts.
"""

from qsmnet.cohort.arguments import (
    ANALYSIS_LEVELS,
    build_bids_app_parser,
    is_bids_app_call,
    parse_bids_app,
)
from qsmnet.cohort.study import SUMMARY_COLUMNS, SUMMARY_NAME, run_bids_app
from qsmnet.cohort.subjects import (
    SubjectResult,
    run_subject,
    select_participants,
    subject_state,
)

__all__ = ["ANALYSIS_LEVELS", "SUMMARY_COLUMNS", "SUMMARY_NAME", "SubjectResult",
           "build_bids_app_parser", "is_bids_app_call", "parse_bids_app", "run_bids_app",
           "run_subject", "select_participants", "subject_state"]
