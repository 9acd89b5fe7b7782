"""Compare the losses of finished training runs: a table, figures and report.md.

    python report.py logs/high_uncertainty/multiruns/2026-01-01_12-00-00
    python report.py SWEEP_A SWEEP_B --output comparison --no-theory
    python report.py SWEEP logger=wandb          # also to a wandb run beside the training runs

The work is done by :mod:`biasseg.pipelines.report`; ``biasseg-report`` is the same command.
"""

from biasseg.pipelines.report import cli

if __name__ == "__main__":
    cli()
