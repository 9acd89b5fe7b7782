"""Theory: the volumes that losses imply at the optimum of their expected value under known
label uncertainty (binary: one foreground class).

* :func:`predicted_volume_bias`: a training run's loss on the run's own validation cases;
* :func:`bias_curve`: losses' bias against σ for one sphere (``python theory.py``);
* :func:`run_bias_curve`: that curve for a synthetic training run's loss and data.
"""

from biasseg.theory.curves import bias_curve, run_bias_curve
from biasseg.theory.prediction import predicted_volume_bias

__all__ = ["bias_curve", "predicted_volume_bias", "run_bias_curve"]
