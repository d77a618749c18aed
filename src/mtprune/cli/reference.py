"""The command-line reference (``docs/cli.md``), generated from the argparse parser so that it cannot drift:
``python -m mtprune.cli.reference > docs/cli.md``; a test checks the file equals the output."""

from __future__ import annotations

import argparse

from mtprune.cli import build_parser

HEADER = """# Command-line reference

Generated from the argparse parser by `python -m mtprune.cli.reference > docs/cli.md` (a test checks it is
current). `mtprune COMMAND --help` prints the same. How the commands fit together: [README](../README.md).
"""


def _flags(a: argparse.Action) -> str:
    if not a.option_strings:
        return f"`{a.metavar or a.dest}`"
    metavar = a.metavar if isinstance(a.metavar, str) else " ".join(a.metavar) if a.metavar else None
    if a.nargs == 0:
        value = ""
    elif a.choices is not None and not metavar:
        value = " " + "\\|".join(str(c) for c in a.choices)
    else:
        value = f" {metavar or a.dest.upper()}" + (" …" if a.nargs in ("+", "*") else "")
    return ", ".join(f"`{f}{value}`" for f in a.option_strings)


def _help(a: argparse.Action) -> str:
    text = (a.help or "").replace("|", "\\|").replace("\n", " ")
    if a.required:
        text = "**required.** " + text
    if a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text and a.nargs != 0:
        text += f" (default: `{a.default}`)"
    return text


def _command(name: str, p: argparse.ArgumentParser, summary: str) -> str:
    rows = [
        f"| {_flags(a)} | {_help(a)} |"
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
    ]
    table = "\n".join(["| option | meaning |", "|---|---|", *rows]) if rows else "(no options)"
    return f"## mtprune {name}\n\n{summary}\n\n{table}\n"


def reference() -> str:
    """``docs/cli.md``'s text."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    parts = [HEADER] + [_command(n, p, helps.get(n) or "") for n, p in sub.choices.items()]
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
