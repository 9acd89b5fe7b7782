"""Predict each loss's volume bias from theory: the optimum of its expected value under label
uncertainty, for one sphere, swept over the uncertainty σ and the structure radius.

    python theory.py                                   # both kinds, σ 0–3 mm, radii 4/8/16 mm
    python theory.py kinds=[voxel] losses=[ce,softdice] sigmas_mm=[0,1,2]

The work is done by :mod:`biasseg.pipelines.theory`; ``biasseg-theory`` is the same command.
"""

from biasseg.pipelines.theory import cli

if __name__ == "__main__":
    cli()
