"""Theory: the volumes that losses imply at the optimum of their expected value under known
label uncertainty (binary: one foreground class).

* :func:`predicted_volume_bias`: a training run's loss on the run's own validation cases;
* :func:`bias_curve`: losses' bias against σ for one sphere (``python theory.py``);
* :func:`run_bias_curve`: that curve for a synthetic training run's loss and data;
* :func:`predicted_lesion_rows`: a run's loss per lesion, on the run's own validation cases.
"""

from biasseg.theory.curves import bias_curve, run_bias_curve
from biasseg.theory.lesions import predicted_lesion_rows
from biasseg.theory.prediction import predicted_volume_bias

__all__ = ["bias_curve", "predicted_lesion_rows", "predicted_volume_bias", "run_bias_curve"]
