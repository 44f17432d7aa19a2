"""Command-line flags generated from config dataclasses, so that each flag is written once.

A field is a flag when its metadata has "help": --batch-size for `batch_size`, with the field's
default. The type comes from the annotation: a bool is a switch (store_true when it defaults to
False, --x/--no-x otherwise, so that None can mean "decide for me"), a tuple takes one value per
element. The metadata may also give "choices", "metavar", "default_text" (what the help shows
where the value itself reads badly, e.g. "all" for None) and "off" (a flag value that the
config holds as None, e.g. --ema-decay 0).
"""

import argparse
import typing
from dataclasses import MISSING, Field, fields

from capslab.errors import flag_name


def flag_fields(config_class) -> tuple[Field, ...]:
    """The fields of a config dataclass that are command-line flags."""
    return tuple(field for field in fields(config_class) if "help" in field.metadata)


def add_config_flags(parser, config_class) -> None:
    """Add a flag for each of flag_fields(config_class) to a parser or an argument group."""
    hints = typing.get_type_hints(config_class)
    for field in flag_fields(config_class):
        meta, default, annotation = field.metadata, field.default, hints[field.name]
        assert default is not MISSING, f"{field.name}: a flag needs a default"
        # float | None -> [float]; tuple[float, float] -> [float, float]; int -> [int]
        inner = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
        options = {
            "default": default,
            "choices": meta.get("choices"),
            "metavar": meta.get("metavar"),
        }
        if inner[0] is bool:
            options["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is tuple:
            options.update(type=inner[0], nargs=len(inner))
        else:
            options["type"] = inner[0]
        help_text = f"{meta['help']} (default: {meta.get('default_text', shown(default))})"
        options = {name: value for name, value in options.items() if value is not None}
        parser.add_argument(flag_name(field.name), **options, help=help_text.replace("%", "%%"))


def shown(default) -> str:
    """A default as the help shows it: off for False, a tuple as its elements."""
    if default is False:
        return "off"
    if isinstance(default, tuple):
        return " ".join(map(str, default))
    return str(default)


def flag_values(args: argparse.Namespace, config_class) -> dict:
    """The config_class flags' values as the config holds them (tuples; "off" values as None)."""
    values = {}
    for field in flag_fields(config_class):
        value = getattr(args, field.name)
        if isinstance(value, list):
            value = tuple(value)
        elif "off" in field.metadata and value == field.metadata["off"]:
            value = None
        values[field.name] = value
    return values


def parse_flags(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed flags, and the names of those given on the command line (rather than left at
    their defaults).

    argparse fills in a default only where the namespace lacks the attribute, so a second parse
    into a namespace pre-filled with a marker keeps the marker exactly where no flag was given.
    """
    args = parser.parse_args(argv)
    unset = object()
    marked = parser.parse_args(
        argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset))
    )
    return args, {name for name, value in vars(marked).items() if value is not unset}
