"""Accuracy metrics: the public QSM-CI scorer's functions, inside a mask and an eroded mask."""

from qsmnet.metrics.qsm import METRIC_NAMES, score, score_table

__all__ = ["METRIC_NAMES", "score", "score_table"]
