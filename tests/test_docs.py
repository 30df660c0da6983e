"""The documents say what the commands do: ``docs/cli.md`` is the commands' ``--help``, README.md
lists every command and no other, and every default README.md or docs/guide.md states is the
one ``--help`` states. Imports no torch: these run in a second."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.cli.docs import WIDTH, render
from featcache.cli.kit import cli_param

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDE = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
CLI_MD = ROOT / "docs" / "cli.md"


def test_cli_md_is_up_to_date():
    assert CLI_MD.read_text(encoding="utf-8") == render(), \
        "docs/cli.md is out of date with --help: run make docs (python -m featcache.cli.docs > docs/cli.md)"


@pytest.mark.parametrize("name", [None, *sorted(main.commands)])
def test_cli_md_holds_what_help_prints(name):
    """Each block of docs/cli.md is what ``featcache [NAME] --help`` prints, 100 columns wide."""
    args = ([name] if name else []) + ["--help"]
    r = CliRunner().invoke(main, args, prog_name="featcache", terminal_width=WIDTH, max_content_width=WIDTH)
    assert r.exit_code == 0, r.output
    assert f"```text\n{r.output}```" in CLI_MD.read_text(encoding="utf-8")


def _readme_command_lines() -> list[str]:
    block = README.split("\n## Commands\n", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_lists_every_command_once_and_only_real_options():
    lines = _readme_command_lines()
    assert all(line.split()[0] == "featcache" for line in lines), lines
    names = [line.split()[1] for line in lines]
    assert sorted(names) == sorted(main.commands), "README's command list and the commands differ"
    for line in lines:
        command = main.commands[line.split()[1]]
        for flag in re.findall(r"(?<![\w-])--[\w-]+", line):
            opts = {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
            assert flag in opts, f"README: featcache {command.name} has no {flag}"


def _default(command: click.Command, param: click.Parameter):
    """The value a command gets when the option is not given (a flag's False included)."""
    return param.get_default(click.Context(command), call=False)


def _same(default, text: str) -> bool:
    if text == "on":
        return default is True
    if text == "off":
        return default in (False, None)
    if text == "none":
        return default in (None, "", "none", ())
    if isinstance(default, bool):
        return False
    try:
        return float(default) == float(text)
    except (TypeError, ValueError):
        return str(default) == text


def test_readme_command_lines_state_the_real_defaults():
    """``[--top-k 5]`` in README's command list is the default ``--help`` states (an upper-case value
    or a quoted one is a placeholder or an example, not a default)."""
    checked = 0
    for line in _readme_command_lines():
        command = main.commands[line.split()[1]]
        for flag, value in re.findall(r"\[(--[\w-]+) ([a-z0-9.]+)\]", line):
            param = cli_param(command, flag)
            default = _default(command, param)
            assert _same(default, value), f"README: featcache {command.name} {flag} {value}; --help: {default!r}"
            checked += 1
    assert checked >= 8


def _stated(command: click.Command, param: click.Parameter) -> str | None:
    """The default ``--help`` states for ``param``: click's ``[default: ...]`` or the one its help text gives."""
    record = param.get_help_record(click.Context(command))
    said = re.findall(r"\[default: ([^\]]*)\]", record[1] if record else "")
    if not said:
        return None
    text = said[-1]
    if isinstance(param, click.Option) and isinstance(param.show_default, str) and text.startswith("("):
        text = text[1:-1]  # click writes a default given as text in parentheses
    return text


def test_readme_defaults_table_is_what_help_states():
    table = README.split("Defaults worth knowing", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+) (--[\w-]+)` \| `([^`]*)`", table, flags=re.M)
    assert len(rows) >= 6, table
    for name, flag, default in rows:
        command = main.commands[name]
        param = cli_param(command, flag)
        assert param is not None, f"README: featcache {name} has no {flag}"
        assert _stated(command, param) == default, f"README says {name} {flag} defaults to {default!r}; " \
                                                   f"--help: {_stated(command, param)!r}"


def test_readme_names_the_commands_that_take_json():
    said = re.search(r"`--json` \(([^)]*)\)", README).group(1)
    listed = {n.strip() for n in said.replace("\n", " ").split(",")}
    takes = {name for name, c in main.commands.items() if any("--json" in getattr(p, "opts", ()) for p in c.params)}
    assert listed == takes


def _guide_option_rows():
    """(command, flag, stated default) of each row of the guide's option tables, one per flag."""
    command = None
    for line in GUIDE.splitlines():
        heading = re.match(r"^`featcache (\w+)` —", line)
        if line.startswith("#"):
            command = None  # a table after another heading is not an option table
        if heading:
            command = main.commands[heading.group(1)]
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if command is None or len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        flags = re.findall(r"`(--[\w-]+)", cells[0])
        values = [v.strip() for v in cells[1].split(", ")] if len(flags) > 1 else [cells[1].strip()]
        if len(values) != len(flags):
            continue
        for flag, value in zip(flags, values):
            yield command, flag, value


def test_guide_option_tables_state_the_real_defaults():
    """Where a row of the guide's extract and fit tables gives a plain value (``64``, ``adam``, ``on``),
    it is the option's default; prose (``featcache chooses``, ``as above``) is left to the reader."""
    checked = 0
    for command, flag, value in _guide_option_rows():
        param = cli_param(command, flag)
        assert param is not None, f"guide: featcache {command.name} has no {flag}"
        plain = re.fullmatch(r"`?([\w.+-]+)`?", value)
        if not plain or plain.group(1) == "—":
            continue
        default = _default(command, param)
        default = default if default is not None else _stated(command, param)
        assert _same(default, plain.group(1)), f"guide: {command.name} {flag} {value}; --help: {default!r}"
        checked += 1
    assert checked >= 30, checked
