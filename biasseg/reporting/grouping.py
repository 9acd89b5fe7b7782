"""Which runs form one row of the report: a task × loss, over training seeds.

* The task is the run's ``task_name``. When runs of one task name differ in their data
  settings, model or optimiser settings, or training length, each setting becomes its own
  task, labelled by what tells them apart: the experiment choice, the data option, else the
  fewest differing keys that give every setting its own label, e.g. ``train [uncertainty=2.5]``, ``train [lr=0.01]``.
* The loss is the ``loss`` option (``hydra.runtime.choices``), else the loss class name;
  runs of one option with different loss settings are told apart the same way, e.g.
  ``softdice [squared=True]``.

Runs that differ in nothing else (the training seed, execution settings such as
``data.num_workers``) share a row. A key that only some runs' configs hold, with one value
among them, that the other runs lack together with any section around or within it, and
that no run's command line added (``+data.foo=…``), is a setting a later version of biasseg
introduced with its default, the behaviour the runs without it had: it
does not split a study that grew across versions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from biasseg.config_keys import EXECUTION_DATA_KEYS
from biasseg.config_keys import flatten as flat_keys
from biasseg.reporting.runs import Run


@dataclass
class Group:
    """The runs of one task × loss."""

    task: str
    loss: str
    runs: list[Run]

    @property
    def is_cross_entropy(self) -> bool:
        choice = self.runs[0].choices.get("loss")
        target = str(self.runs[0].loss.get("_target_", ""))
        return choice == "ce" if choice else target.endswith("CrossEntropyLoss")


def flatten(section: object, prefix: str = "") -> dict[str, str]:
    """Nested dicts as ``{"a.b": json value}`` (an empty section holds no key)."""
    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in flat_keys(section, prefix).items()
            if not (isinstance(value, dict) and not value)}


MODEL_KEYS_OUTSIDE_THE_TASK = ("model.hypernet", "model.loss", "model.compile", "model.in_channels", "model.num_classes")


def data_signature(run: Run) -> dict[str, str]:
    """What defines a task: the data settings, the model and optimiser, the training length."""
    signature = {k: v for k, v in flatten(run.data).items() if k.split(".")[0] not in EXECUTION_DATA_KEYS}
    # a Tversky hypernetwork is a method compared on the task, named by its loss (reporting.runs);
    # model.loss is the loss (its own signature), compile an execution setting, the channels the data's
    signature.update({k: v for k, v in flatten(run.model, "model.").items()
                      if not k.startswith(MODEL_KEYS_OUTSIDE_THE_TASK)})
    signature["max_epochs"] = json.dumps(run.max_epochs)
    return signature


def loss_signature(run: Run) -> dict[str, str]:
    return flatten(run.loss)


def labels(base: str, runs: list[Run], signature: Callable[[Run], dict[str, str]],
           choice_groups: tuple[str, ...]) -> dict[int, str]:
    """A label per run (by ``id``): ``base``, or ``base [what differs]`` when the runs hold
    several signatures. The chosen options of ``choice_groups`` are tried first, then the
    signature keys that still differ."""
    flats = without_later_defaults(runs, {id(run): signature(run) for run in runs})
    keys = {id(run): json.dumps(flats[id(run)], sort_keys=True) for run in runs}
    if len(set(keys.values())) == 1:
        return {id(run): base for run in runs}
    first = {}  # one run per signature
    for run in runs:
        first.setdefault(keys[id(run)], run)
    parts: dict[str, list[str]] = {key: [] for key in first}
    for group in choice_groups:
        values = {key: run.choices.get(group, "none") for key, run in first.items()}
        if len(set(values.values())) > 1:
            for key, value in values.items():
                parts[key].append(f"{group}={value}")
    colliding: dict[tuple, list[str]] = {}
    for key in first:
        colliding.setdefault(tuple(parts[key]), []).append(key)
    for members in colliding.values():
        if len(members) > 1:
            member_flats = [flats[id(first[key])] for key in members]
            telling = telling_keys(member_flats)
            for key in members:
                flat = flats[id(first[key])]
                parts[key] += [f"{n.rsplit('.', 1)[-1]}={_short(flat.get(n))}" for n in telling]
    return {id(run): f"{base} [{', '.join(parts[keys[id(run)]])}]" for run in runs}


def without_later_defaults(runs: list[Run], flats: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
    """``flats`` without the keys that a later version added (see the module docstring): held
    by some runs only, with one value, and not added on any run's command line."""
    every = [set(flat) for flat in flats.values()]
    partial = set().union(*every) - set.intersection(*every)
    added = [key for run in runs for key in run.added_keys]

    def absent(name: str, flat: dict[str, str]) -> bool:
        """Neither the key nor a section around it or within it (``augmentation: null`` in
        one run, ``augmentation.gamma`` in another is a difference, not an addition)."""
        return not any(k == name or name.startswith(k + ".") or k.startswith(name + ".") for k in flat)

    later = {name for name in partial
             if len({flat[name] for flat in flats.values() if name in flat}) == 1
             and all(absent(name, flat) for flat in flats.values() if name not in flat)
             and not any(key == name or key.endswith("." + name) for key in added)}
    return {run_id: {k: v for k, v in flat.items() if k not in later} for run_id, flat in flats.items()}


def telling_keys(flats: list[dict[str, str]]) -> list[str]:
    """Few keys whose values tell the distinct ``flats`` apart: greedily the key that separates
    the most, until every flat has its own combination (so no two settings share a label)."""
    names = sorted(n for n in set().union(*flats) if len({flat.get(n) for flat in flats}) > 1)
    chosen: list[str] = []

    def distinct(keys: list[str]) -> int:
        return len({tuple(flat.get(k) for k in keys) for flat in flats})

    while distinct(chosen) < len(flats):
        chosen.append(max((n for n in names if n not in chosen), key=lambda n: distinct([*chosen, n])))
    return sorted(chosen)


def _short(value: str | None) -> str:
    if value is None:
        return "unset"
    loaded = json.loads(value)
    return loaded if isinstance(loaded, str) else json.dumps(loaded).replace(" ", "")


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of the given runs, by task then loss (cross-entropy first)."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.task_name, []).append(run)
    task_of: dict[int, str] = {}
    for name, members in by_name.items():
        task_of.update(labels(name, members, data_signature, ("experiment", "data", "model", "model/optimizer")))
    by_task_loss: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_task_loss.setdefault((task_of[id(run)], run.loss_name), []).append(run)
    groups = []
    for (task, loss_name), members in by_task_loss.items():
        loss_of = labels(loss_name, members, loss_signature, ())
        split: dict[str, list[Run]] = {}
        for run in members:
            split.setdefault(loss_of[id(run)], []).append(run)
        groups += [Group(task, loss, sorted(rs, key=lambda r: (r.seed is None, r.seed or 0))) for loss, rs in split.items()]
    return sorted(groups, key=lambda g: (g.task, not g.is_cross_entropy, g.loss))


def reference_group(groups: list[Group], task: str) -> Group | None:
    """The task's cross-entropy group: the one labelled ``ce`` when there are several."""
    candidates = [g for g in groups if g.task == task and g.is_cross_entropy]
    exact = [g for g in candidates if g.loss == "ce"]
    return (exact or candidates or [None])[0]
