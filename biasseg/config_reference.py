"""The configuration reference of the manual, written from the configs' own comments.

Every key in ``configs/`` carries a one-line comment (``python train.py --help`` shows the same
text); :func:`reference_markdown` turns them into the tables of ``docs/configuration.md``
at every documentation build (the mkdocs hook ``scripts/mkdocs_hooks.py``), so the reference cannot
drift from the configs.
"""

from __future__ import annotations

from pathlib import Path

from biasseg.cli import CONFIGS, commented_keys, first_comment, group_defaults, option_keys

PRIMARIES = ("train", "evaluate", "predict", "score", "theory")  # the entry points' primary configs
# nested option folders, with the key they fill; data/loader is merged into every data option
NESTED_GROUPS = {"model/optimizer": "model.optimizer", "hydra/launcher": "hydra.launcher"}
MERGED = ("data/loader",)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, str]], headers: tuple[str, str]) -> list[str]:
    lines = [f"| {headers[0]} | {headers[1]} |", "| --- | --- |"]
    return lines + [f"| `{_cell(key)}` | {_cell(comment)} |" for key, comment in rows]


def _group_folders() -> list[tuple[str, Path]]:
    """``(group, folder)`` of every folder of options, nested ones by their path."""
    folders = []
    for folder in sorted(p for p in CONFIGS.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        group = folder.relative_to(CONFIGS).as_posix()
        if group not in MERGED:
            folders.append((group, folder))
    return folders


def reference_markdown() -> str:
    """Markdown: each entry point's keys, then each group's options and their keys."""
    lines = ["## Entry points", "",
             "Each entry point's own keys (`python <entry point>.py --help` prints the same); its groups follow below.", ""]
    for primary in PRIMARIES:
        path = CONFIGS / f"{primary}.yaml"
        defaults = {g: o for g, o in group_defaults(primary) if g not in ("hydra", "paths")}
        lines += [f"### `{primary}.py`", "", first_comment(path), ""]
        if defaults:
            lines += ["Groups (default option): " + ", ".join(f"`{g}` ({o or 'none'})" for g, o in defaults.items()), ""]
        lines += _table(commented_keys(path), ("key", "meaning")) + [""]
    lines += ["## Groups", "",
              "Choose an option with `group=option`; set one of its keys with `group.key=value`.", ""]
    for group, folder in _group_folders():
        key_prefix = NESTED_GROUPS.get(group, group)
        lines += [f"### `{group}`", "", "| option | what it is |", "| --- | --- |"]
        options = sorted(folder.glob("*.yaml"))
        lines += [f"| `{group}={option.stem}` | {_cell(first_comment(option))} |" for option in options]
        lines.append("")
        for option in options:
            keys = option_keys(option)
            if not keys:
                continue
            lines += [f"#### `{group}={option.stem}`", ""]
            prefix = "" if option.read_text().startswith("# @package _global_") else f"{key_prefix}."
            lines += _table([(f"{prefix}{key}", comment) for key, comment in keys], ("key", "meaning")) + [""]
    return "\n".join(lines)
