"""Build argparse flags from config dataclasses, so defaults and help live in one place."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per field of `cls`; bools become --x/--no-x."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # argparse %-formats help strings: a literal % (in a help text or a default) must be doubled.
        help_text = (f.metadata.get("help", "") + f" (default: {default})").replace("%", "%%")
        args = typing.get_args(kind)
        optional = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        base = next((a for a in args if a is not type(None)), kind) if optional else kind
        if base is bool:
            group.add_argument(_flag(prefix + f.name), default=default, action=argparse.BooleanOptionalAction,
                               help=help_text, dest=prefix + f.name)
        else:
            group.add_argument(_flag(prefix + f.name), type=base, default=default, help=help_text,
                               dest=prefix + f.name)


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if f.init}
    return cls(**values)


def add_config_command(subparsers, name: str, cls, run, help: str) -> argparse.ArgumentParser:
    """A subcommand whose flags are the fields of the config dataclass `cls` and which calls
    `run(config)` with the config they make."""
    parser = subparsers.add_parser(name, help=help)
    add_dataclass_args(parser, cls)
    parser.set_defaults(func=lambda args: run(dataclass_from_args(cls, args)))
    return parser
