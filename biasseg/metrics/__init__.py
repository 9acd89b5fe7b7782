"""Segmentation metrics: per-subject Dice and volumes (ml), and their summaries."""

from biasseg.metrics.subject_metrics import PER_SUBJECT_KEYS, SubjectSegmentationMetrics, per_subject
from biasseg.metrics.volume_summary import per_class_summary, summarize

__all__ = ["PER_SUBJECT_KEYS", "SubjectSegmentationMetrics", "per_subject", "per_class_summary", "summarize"]
