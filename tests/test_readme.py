"""The README cannot drift from the code: every `dualsynth` command and option it shows exists, and its Python
example runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from dualsynth.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _commands() -> list[list[str]]:
    """Every `dualsynth ...` invocation in the README's bash blocks (continuation lines joined)."""
    found = []
    for block in _code_blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("dualsynth "):
                found.append(shlex.split(line)[1:])
    return found


def test_readme_shows_commands():
    assert len(_commands()) >= 5


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a[:1]))
def test_readme_command_and_options_exist(argv):
    assert argv, "empty dualsynth call"
    name = argv[0]
    if name.startswith("-"):
        return  # e.g. `dualsynth --help`
    assert name in cli.commands, f"README shows unknown command '{name}'"
    command = cli.commands[name]
    known = {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts}
    known |= {"--help", "-h"}
    for token in argv[1:]:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in known, f"README: '{name}' has no option {option}"


def test_every_command_is_documented_in_the_readme():
    text = README.read_text(encoding="utf-8")
    for name in cli.commands:
        assert f"dualsynth {name}" in text, f"README does not document 'dualsynth {name}'"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python API example runs as written (tiny data, a few seconds)."""
    blocks = _code_blocks("python")
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "api" / "unet" / "checkpoints" / "best.pt").is_file()
