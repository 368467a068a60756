"""Every subcommand's --help renders: argparse %-formats help texts, so one stray % in a config
field's help or default would crash `--help` (it did, for `router label`)."""
from __future__ import annotations

import argparse

import pytest

from adadepth.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, prefix + (name,))


def test_every_subcommand_help_renders(capsys):
    commands = list(_commands(build_parser()))
    assert ("router", "label") in commands and ("distill-data",) in commands and len(commands) >= 12
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*command, "--help"])
        assert exit_info.value.code == 0, command
        assert "usage:" in capsys.readouterr().out, command


def test_router_commands_measure_in_float32_and_serving_picks_the_machines_dtype():
    parse = build_parser().parse_args
    for command in ("label", "train", "eval"):
        assert parse(["router", command]).dtype == "float32"       # the shipped labels' dtype
    assert parse(["router", "eval", "--dtype", "auto"]).dtype == "auto"
    assert parse(["serve"]).dtype == "auto" and parse(["generate", "hi"]).dtype == "auto"
