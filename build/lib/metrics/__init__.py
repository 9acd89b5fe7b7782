"""Segmentation metrics: per-subject Dice and volumes (ml), and their summaries."""

from metrics.subject_metrics import PER_SUBJECT_KEYS, SubjectSegmentationMetrics, per_subject
from metrics.volume_summary import per_class_summary, summarize

__all__ = ["PER_SUBJECT_KEYS", "SubjectSegmentationMetrics", "per_subject", "per_class_summary", "summarize"]
