"""The manual and the front page: every documented command composes as written (its groups,
options and keys exist in the configs), README.md stays a front page, and the configuration
reference is written from every config's comments. (`mkdocs build --strict` runs in .ci/run.)"""

import re
import shlex

import pytest
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from biasseg.cli import CONFIGS, commented_keys
from biasseg.config_reference import reference_markdown

ENTRY_POINTS = ("train", "evaluate", "predict", "score", "theory")  # the Hydra entry points (report.py takes paths)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str, str]]:
    """``(document, entry point, arguments)`` of every ``python <entry point>.py …`` in README.md
    and docs/: each line that is a command (fenced or indented code; continuation lines joined,
    comments dropped) and each inline code span that is one."""
    found = []
    pattern = rf"python ({'|'.join(ENTRY_POINTS)})\.py((?:\s[^`]*)?)"
    for document in DOCUMENTS:
        text = document.read_text()
        for line in text.replace("\\\n", " ").splitlines():  # fenced or indented code: a line that is a command
            match = re.match(r"\s*(?:\$\s+)?" + pattern + "$", line)
            if match:
                found.append((document.name, match.group(1), match.group(2).split("  #")[0].split(" # ")[0]))
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
            match = re.fullmatch(pattern, span.strip())
            if match:
                found.append((document.name, match.group(1), match.group(2)))
    return found


def checkable(token: str) -> str:
    """An override as Hydra parses it: an optional ``[key=value]`` unwrapped, a placeholder
    value (``…``, ``FILE``) replaced by one Hydra accepts, so that the key is what is checked."""
    token = token.strip("[]")
    try:
        OverridesParser.create().parse_override(token)
        return token
    except Exception:
        return token.split("=", 1)[0] + "=placeholder"


COMMANDS = documented_commands()


def test_the_documents_hold_commands_for_every_entry_point():
    assert {entry for _, entry, _ in COMMANDS} >= {"train", "evaluate", "predict", "score"}
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("document, entry, arguments", COMMANDS, ids=[f"{d}:{e}:{a[:60]}" for d, e, a in COMMANDS])
def test_each_documented_command_composes_as_written(document, entry, arguments):
    """Its groups and options exist and every key it sets is a key of the composed config (a
    sweep is checked at its first value)."""
    tokens = [checkable(t) for t in shlex.split(arguments) if "=" in t and not t.startswith("-")]
    overrides = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
                 for o in OverridesParser.create().parse_overrides(tokens)]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        compose(entry, overrides=overrides, return_hydra_config=True)  # raises for an unknown key, group or option


def test_the_readme_is_a_front_page_linking_every_manual_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert page.name == "index.md" or f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    assert "pip install -r requirements.txt\npython train.py" in readme and "\npytest" in readme


def test_the_configuration_reference_holds_every_commented_key():
    reference = reference_markdown()
    for config in sorted(CONFIGS.rglob("*.yaml")):
        for key, _ in commented_keys(config):
            assert f"{key}`" in reference, f"{config.relative_to(CONFIGS)}: {key} is missing from the reference"
        if config.parent != CONFIGS and config.parent.name != "loader":
            assert f"={config.stem}`" in reference, f"option {config.relative_to(CONFIGS)} is missing"
