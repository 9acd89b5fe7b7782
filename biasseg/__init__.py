"""biasseg: 3D segmentation with pluggable losses, measured every epoch for Dice and volume bias.

The entry points (``train.py``, ``evaluate.py``, ``predict.py``, ``score.py``, ``report.py``,
``theory.py`` and their console scripts ``biasseg-train`` …) run :mod:`biasseg.pipelines`; the
data (:mod:`datamodules`) and the model (:mod:`lightning_modules`) stay at the top, where users
look for them. CONTRIBUTING.md draws the layout and says where each kind of change goes.
"""
