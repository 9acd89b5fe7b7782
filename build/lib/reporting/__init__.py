"""Parts of ``report.py``: comparing the losses of finished training runs.

* :mod:`reporting.runs`: finding run directories and reading their results;
* :mod:`reporting.grouping`: which runs form one task × loss row;
* :mod:`reporting.measures`: per-subject Dice and volume errors of one run;
* :mod:`reporting.statistics`: seed averaging, mean ± sd, the paired Wilcoxon test;
* :mod:`reporting.theory_link`: the theory's predicted volume bias, cached per configuration;
* :mod:`reporting.table`: the rows of ``results.csv``;
* :mod:`reporting.plots`: the figures; :mod:`reporting.markdown`: ``report.md``.
"""
