"""Evaluate a trained checkpoint on whole volumes, measured where each case was annotated.

    python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/best-….ckpt
    python evaluate.py ckpt_path=… data=folder data.root=/data/OtherDataset        # every case of another dataset
    python evaluate.py 'ckpt_path=logs/study/high_uncertainty/ce/seed*/checkpoints/last.ckpt'   # a deep ensemble
    python evaluate.py ckpt_path=…/hypernet.ckpt alpha=0.3     # a Tversky hypernetwork at one α

The work is done by :mod:`biasseg.pipelines.evaluate`; ``biasseg-evaluate`` is the same command.
"""

from biasseg.pipelines.evaluate import cli

if __name__ == "__main__":
    cli()
