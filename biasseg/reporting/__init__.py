"""Parts of ``report.py``: comparing the losses of finished training runs.

* :mod:`biasseg.reporting.runs`: finding run directories and reading their results;
* :mod:`biasseg.reporting.grouping`: which runs form one task × loss row;
* :mod:`biasseg.reporting.measures`: per-subject Dice and volume errors of one run;
* :mod:`biasseg.reporting.statistics`: seed averaging, mean ± sd, the paired Wilcoxon test;
* :mod:`biasseg.reporting.theory_link`: the theory's predicted volume bias, cached per configuration;
* :mod:`biasseg.reporting.table`: the rows of ``results.csv``;
* :mod:`biasseg.reporting.plots`: the figures; :mod:`biasseg.reporting.markdown`: ``report.md``.
"""
