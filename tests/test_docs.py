"""The documentation matches the code: the CLI reference is the parser's, the README stays short, links
resolve, and the timing vocabulary keeps ``cost`` and ``prune`` small (issue 30)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mtprune.cli import build_parser, main
from mtprune.cli.reference import reference

ROOT = Path(__file__).resolve().parents[1]


def _options(command: str) -> list[str]:
    """The options ``mtprune COMMAND --help`` lists (``--help`` not counted, hidden old flags not listed)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [
        a.option_strings[-1]
        for a in sub.choices[command]._actions
        if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]


def test_docs_cli_md_is_the_parser_s_reference():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert text == reference(), "docs/cli.md is stale: python -m mtprune.cli.reference > docs/cli.md"
    for flag in _options("prune") + _options("cost"):
        assert f"`{flag}" in text


def test_cost_and_prune_keep_few_options():
    assert len(_options("cost")) <= 17 and len(_options("prune")) <= 25
    assert "--runtime" in _options("cost") and "--trust-code" in _options("prune")


@pytest.mark.parametrize("flag, new", [("--best", "--runtime best"), ("--threads", "--timing threads=T")])
def test_an_old_timing_flag_names_its_new_spelling(flag, new, capsys, tmp_path):
    argv = ["cost", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--size", "32", "32", "--latency", flag]
    assert main([*argv, *(["2"] if flag == "--threads" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mtprune cost: error: {flag} is now {new}" and "\n" not in err


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "python -m pytest -q" in readme  # CI runs the README's test command
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
