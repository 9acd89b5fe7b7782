"""Train a 3D U-Net with a configurable loss and report Dice and volume bias per subject.

    python train.py                          # embedded synthetic data, cross-entropy
    python train.py loss=softdice trainer.max_epochs=5
    python train.py -m loss=ce,softdice seed=0,1,2

The work is done by :mod:`biasseg.pipelines.train`; ``biasseg-train`` is the same command.
"""

from biasseg.pipelines.train import cli

if __name__ == "__main__":
    cli()
