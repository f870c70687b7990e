"""Command-line flags generated from config dataclasses, so each option is defined once (name, type, default,
help) - PEFT's config-dataclass style, with argparse.

    add_config_flags(group, M2PTConfig, exclude=("seed",), aliases={"text_prompt_length": ["--PT_len_llm"]})

Field metadata: "help" (required), "choices", "nargs", "type" (for fields whose default is None), "group" (which
--help section lists it; read by the app, not passed to argparse). A bool field is read as Hugging Face's
HfArgumentParser reads it: `--name`, `--name True|False`; one that defaults to True also gets `--no_name`, whose
"no_help" (required) says what it does, since the field's own help describes the behaviour it turns off. Spelling
is Hugging Face's: underscores. The kebab-case spellings parse too, with a warning (`normalize_kebab_flags`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends "(default: X)" to every flag that has a meaningful default."""

    def _get_help_string(self, action):
        h = action.help or ""
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.type is parse_bool:
            return h  # a switch: its help says what giving it does
        if ("%(default)" in h or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return h
        return h + " (default: %(default)s)"


def parse_bool(text: str) -> bool:
    """`--X True` / `--X false` / `--X 1` ..., as Hugging Face's HfArgumentParser (and so every LLaVA script) writes
    booleans."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def _add_bool(parser, name: str, kw: dict, default: bool, no_help: str | None, names: list[str], owner: str) -> None:
    """`--name` (True), `--name True|False`, and for a field that defaults to True also `--no_name`."""
    parser.add_argument(*names, **kw, type=parse_bool, nargs="?", const=True, default=default,
                        metavar="True|False")
    if default:
        if no_help is None:
            raise TypeError(f"{owner}.{name} defaults to True: it also gets --no_{name}, and its metadata needs a "
                            f"'no_help' saying what --no_{name} does")
        parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=no_help)


def add_config_flags(parser, cls, include=None, exclude=(), aliases=None) -> None:
    aliases = aliases or {}
    for f in fields(cls):
        if (include is not None and f.name not in include) or f.name in exclude:
            continue
        meta = dict(f.metadata)
        meta.pop("group", None)
        kw = {"help": meta.pop("help"), "dest": f.name}
        no_help = meta.pop("no_help", None)
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        names = [f"--{f.name}", *aliases.get(f.name, [])]
        if isinstance(default, bool):
            _add_bool(parser, f.name, kw, default, no_help, names, cls.__name__)
            continue
        if default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        kw["type"] = meta.pop("type", type(default) if default not in (MISSING, None) else str)
        kw.update(meta)
        parser.add_argument(*names, **kw)


def config_parser(cls, description: str | None) -> argparse.ArgumentParser:
    """The parser of an app whose flags are the fields of one config dataclass (evaluate, chat, serve): its module
    docstring as the description, every field a flag."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_config_flags(parser, cls)
    return parser


def normalize_kebab_flags(argv: list[str], parser: argparse.ArgumentParser, renamed: dict | None = None) -> list[str]:
    """Rewrite deprecated spellings (`--image-root`, or a renamed flag) to the current one, with a warning on
    stderr; anything else is left for argparse to judge."""
    known = {s for a in parser._actions for s in a.option_strings}
    renamed = renamed or {}
    out = []
    for tok in argv:
        name, eq, value = tok.partition("=")
        new = renamed.get(name) or ("--" + name[2:].replace("-", "_") if name.startswith("--") else name)
        if name.startswith("--") and new != name and new in known and name not in known:
            print(f"warning: {name} is deprecated; use {new}", file=sys.stderr)
            tok = new + eq + value
        out.append(tok)
    return out
