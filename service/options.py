"""Typed configs as frozen dataclasses, and the command lines and option tables derived from them.

Each field carries its default and its help text side by side (:func:`option`); the CLI
(:func:`add_dataclass_options`) and the README's option tables (:func:`options_table`) are both
generated from the fields, so they cannot drift from the code. Shared by the training job and the
predict CLI (training may import the service's modules; the service never imports training).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import field


def option(default=dataclasses.MISSING, help: str = "", **extra):
    """A dataclass field with its CLI help (and ``choices``, or ``positional=True``)."""
    return field(default=default, metadata={"help": help, **extra})


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _base_type(annotation) -> type:
    """``int | None`` -> ``int``; ``tuple[str, ...]`` -> ``tuple``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(annotation) or annotation


def _element_type(annotation) -> type:
    """``tuple[Path, ...]`` -> ``Path``."""
    args = [arg for arg in typing.get_args(annotation) if arg is not Ellipsis]
    return args[0] if args else str


def _shown(default) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _help_with_default(text: str, default) -> str:
    return text if "default" in text else f"{text} (default: {_shown(default)})"


def flag_of(config_field: dataclasses.Field) -> str:
    return "--" + config_field.name.replace("_", "-")


def add_dataclass_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one argument per field of ``config_class``: ``--option`` with its default and help,
    or a positional argument (one or more values) for a field marked ``positional``."""
    hints = typing.get_type_hints(config_class)
    for config_field in dataclasses.fields(config_class):
        kind = _base_type(hints[config_field.name])
        help_text = config_field.metadata["help"]
        if config_field.metadata.get("positional"):
            parser.add_argument(
                config_field.name,
                nargs="+",
                type=_element_type(hints[config_field.name]),
                help=help_text,
            )
            continue
        default = config_field.default
        kwargs: dict = {
            "dest": config_field.name,
            "default": default,
            # argparse reads "%" as a format: "90% confidence" must reach it as "90%% confidence".
            "help": _help_with_default(help_text, default).replace("%", "%%"),
        }
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = parse_csv if kind is tuple else kind
            kwargs["metavar"] = config_field.name.upper()
        if "choices" in config_field.metadata:
            kwargs["choices"] = tuple(config_field.metadata["choices"])
        parser.add_argument(flag_of(config_field), **kwargs)


def config_from_args(args: argparse.Namespace, config_class: type):
    """The config of parsed arguments (positional lists become tuples)."""
    values = {}
    for config_field in dataclasses.fields(config_class):
        value = getattr(args, config_field.name)
        values[config_field.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values)


_DEFAULT_IN_HELP = re.compile(r"\s*\(default: ([^)]*)\)")


def options_table(config_class: type) -> str:
    """A Markdown table of the options of ``config_class``: flag, default, meaning.

    A default described in the help text ("(default: all)") is shown as that description."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for config_field in dataclasses.fields(config_class):
        if config_field.metadata.get("positional"):
            continue
        flag = flag_of(config_field)
        if isinstance(config_field.default, bool):
            flag = f"{flag} / --no-{flag[2:]}"
        meaning = config_field.metadata["help"]
        described = _DEFAULT_IN_HELP.search(meaning)
        if described:
            default = described.group(1)
            meaning = _DEFAULT_IN_HELP.sub("", meaning, count=1)
        else:
            default = f"`{_shown(config_field.default)}`"
        if "choices" in config_field.metadata:
            meaning += "; one of " + ", ".join(
                f"`{choice}`" for choice in config_field.metadata["choices"]
            )
        meaning = meaning.replace("|", "\\|").replace("<", "\\<")
        rows.append(f"| `{flag}` | {default} | {meaning} |")
    return "\n".join(rows)
