"""Segment new images with a trained checkpoint, in each input's own geometry.

    python predict.py ckpt_path=…/best.ckpt input=scans/ output=predictions/
    python predict.py "ckpt_path=runs/seed*/checkpoints/last.ckpt" input=… output=…   # an ensemble: maps averaged
    python predict.py ckpt_path=…/hypernet.ckpt alpha=0.3 input=… output=…        # a Tversky hypernetwork at one α

The work is done by :mod:`biasseg.pipelines.predict`; ``biasseg-predict`` is the same command.
"""

from biasseg.pipelines.predict import cli

if __name__ == "__main__":
    cli()
