"""Score the predictions of any tool (nnU-Net, MONAI, …) for Dice and volume bias.

    python score.py predictions=nnunet_out/ labels=Dataset001/labelsTs/
    python score.py predictions=masks/ labels=labels/ expected=probability_maps/

The work is done by :mod:`biasseg.pipelines.score`; ``biasseg-score`` is the same command.
"""

from biasseg.pipelines.score import cli

if __name__ == "__main__":
    cli()
