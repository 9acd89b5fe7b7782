"""The command line of the entry points: ``--help`` built from the configs' own comments, and
misspelt keys caught before Hydra starts, with their close matches.

Every key in ``configs/`` carries a one-line comment; ``python train.py --help`` shows them
for the primary config and each group's default option, and lists every group's options
with the first comment line of each option's file. ``python train.py trainer.max_epoch=3``
stops with ``did you mean trainer.max_epochs?`` instead of Hydra's hint to add a ``+``.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

import biasseg.resolvers  # noqa: F401  (the configs' resolvers, also registered by hydra_plugins/)
from biasseg.config_keys import all_keys

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/ (the install is editable)


def compose_config(primary: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/<primary>.yaml`` composed with ``overrides`` as the command line would compose
    it, without starting a Hydra run (tests, scripts, the key check below)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(primary, overrides=list(overrides))


def commented_keys(path: Path) -> list[tuple[str, str]]:
    """``(dotted key, comment)`` of every key of a YAML file that carries an end-of-line comment,
    read by a YAML parser that keeps comments (a ``#`` inside a quoted value is no comment)."""
    rows: list[tuple[str, str]] = []

    def walk(node: CommentedMap, prefix: str) -> None:
        for key, value in node.items():
            if key == "defaults":
                continue
            token = (node.ca.items.get(key) or [None] * 3)[2]
            comment = token.value.split("\n")[0].lstrip("#").strip() if token is not None else ""
            if comment:
                rows.append((f"{prefix}{key}", comment))
            if isinstance(value, CommentedMap):
                walk(value, f"{prefix}{key}.")

    document = YAML(typ="rt").load(path.read_text())
    if isinstance(document, CommentedMap):
        walk(document, "")
    return rows


def option_keys(path: Path) -> list[tuple[str, str]]:
    """:func:`commented_keys` of an option file, with those of the files its ``defaults``
    merge into it (``loader@_here_: default``, ``optimizer: sgd``)."""
    keys = []
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            for group, option in entry.items():
                package = group.split("@")
                nested = path.parent / package[0] / f"{option}.yaml"
                if option is not None and nested.is_file():
                    prefix = "" if package[-1] == "_here_" else f"{package[0]}."
                    keys += [(prefix + key, comment) for key, comment in commented_keys(nested)]
    return keys + commented_keys(path)


def first_comment(path: Path) -> str:
    """The first comment line of a config file (what the option is)."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def group_defaults(primary: str) -> list[tuple[str, object]]:
    """``(group, default option)`` of ``configs/<primary>.yaml``'s defaults list, in order."""
    defaults = OmegaConf.load(CONFIGS / f"{primary}.yaml").get("defaults", [])
    return [(k, v) for entry in defaults if isinstance(entry, (dict, DictConfig)) for k, v in entry.items()]


def help_text(primary: str) -> str:
    """``--help`` for ``configs/<primary>.yaml``: its keys, its groups' options, the keys of
    each group's default option."""
    lines = [f"python {primary}.py [group=option ...] [key=value ...]   (Hydra: -m for sweeps, --cfg job to print the config)",
             "", "== Keys ==", ""]
    width = 34
    lines += [f"  {key:<{width}} {comment}" for key, comment in commented_keys(CONFIGS / f"{primary}.yaml")]
    for group, default in group_defaults(primary):
        folder = CONFIGS / group
        if not folder.is_dir() or group in ("paths", "hydra"):
            continue
        lines += ["", f"== {group}=… (default: {default}) ==", ""]
        for option in sorted(folder.glob("*.yaml")):
            lines.append(f"  {group}={option.stem:<{width - len(group) - 1}} {first_comment(option)}")
        if default is not None and (folder / f"{default}.yaml").is_file():
            keys = option_keys(folder / f"{default}.yaml")
            if keys:
                lines.append(f"  keys of {group}={default}:")
                lines += [f"    {group}.{key:<{width - len(group) - 3}} {comment}" for key, comment in keys]
    return "\n".join(lines)


def unknown_key_message(primary: str, arguments: list[str]) -> str | None:
    """Why an override on the command line names no key of the composed config (with its close
    matches), or None. Group choices, ``+``/``~`` overrides and Hydra's own keys are Hydra's."""
    overrides = [a for a in arguments if "=" in a and not a.startswith("-")]
    def is_group(argument: str) -> bool:
        key = argument.lstrip("+~").split("=", 1)[0].split("@")[0]
        return (CONFIGS / key).is_dir() or argument.startswith(("+", "~", "hydra."))

    groups = [a for a in overrides if is_group(a)]
    keyed = [a.split("=", 1)[0] for a in overrides if a not in groups]
    if not keyed:
        return None
    choices = [g.split(",")[0] if "=" in g and "," in g.split("=", 1)[1] else g for g in groups]  # a sweep's first option
    try:
        cfg = compose_config(primary, [g for g in choices if not g.startswith("hydra.")])
    except Exception:
        return None  # a problem with the groups: Hydra explains it itself
    known = all_keys(OmegaConf.to_container(cfg, resolve=False))
    for key in keyed:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if key in known:
            continue
        if parent in known and not isinstance(OmegaConf.select(cfg, parent, throw_on_resolution_failure=False), DictConfig):
            continue  # inside a list or a null section (e.g. a dropped augmentation): Hydra's to judge
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; `python {primary}.py --help` lists the keys"
        return f"error: {key} is not a key of the {primary} config{hint} (add a new key with +{key}=…)"
    return None


def check_command_line(primary: str) -> None:
    """Answer ``--help`` from the configs, and stop on a misspelt key, before Hydra runs."""
    arguments = sys.argv[1:]
    if "--help" in arguments or "-h" in arguments:
        print(help_text(primary))
        sys.exit(0)
    try:
        message = unknown_key_message(primary, arguments)
    except Exception:  # never let the check itself stop a run: Hydra reports what it finds
        message = None
    if message:
        print(message, file=sys.stderr)
        sys.exit(1)
