"""What several command groups share: argument types, flags generated from settings, the registry an invocation
names, tables, token ids."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from hotswap.errors import InvalidArgument
from hotswap.registry import Registry
from hotswap.settings import Setting

Command = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    def __call__(self, name: str, fn: Command, help_: str, *, registry: bool = True, hub: bool = True) -> Parser:
        """A subcommand running ``fn``; with ``registry`` its own ``--registry``, with ``hub`` ``--token`` for
        hf:// registries (commands using no registry take neither)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def token_ids(text: str) -> list[int]:
    """``--prompt-ids 5,17,99``."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_setting_flags(
    parser: argparse.ArgumentParser,
    settings: Iterable[Setting],
    *,
    types: Mapping[str, Callable[[str], object]] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> dict[type, argparse._ArgumentGroup]:
    """One flag per setting (a dataclass field: :mod:`hotswap.settings`), its help and choices the field's
    metadata, its type the field's; in a group per dataclass, titled by the first line of its docstring (returned
    by dataclass). An unset flag leaves no attribute, so the dataclass's default (or a config file's value)
    applies: the flags restate no default, their help only shows it. ``types`` parses a setting's flag otherwise
    than by its type (e.g. :func:`positive_int`); ``aliases`` are more names of a setting's flag (no dashes)."""
    groups: dict[type, argparse._ArgumentGroup] = {}
    for s in settings:
        if s.owner not in groups:
            groups[s.owner] = parser.add_argument_group((s.owner.__doc__ or "").split("\n")[0].rstrip("."))
        hidden = any(s.default is unset for unset in (None, False, dataclasses.MISSING)) or s.default == ""
        notes = [] if hidden else [f"default: {s.default}"]
        if s.alias != s.name:
            notes.append(f"key {s.name}")
        kwargs: dict[str, Any] = {"dest": s.name, "default": argparse.SUPPRESS}
        kwargs["help"] = s.help + (f" ({'; '.join(notes)})" if notes else "")
        if s.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if s.default else "store_true"
        else:
            kwargs.update(type=(types or {}).get(s.name, s.kind), choices=s.choices)
            if s.choices is None:
                kwargs["metavar"] = s.flag.upper().replace("-", "_")
        flags = [s.flag, *(aliases or {}).get(s.name, ())]
        groups[s.owner].add_argument(*(f"--{flag}" for flag in flags), **kwargs)
    return groups


def registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options may be added when it is first used (``defer``): ``serve``'s are generated
    from the serving dataclasses, whose import loads torch, which no other command should wait for."""

    _deferred: Callable[[argparse.ArgumentParser], None] | None = None

    def defer(self, add_options: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred = add_options

    def _complete(self) -> None:
        if self._deferred is not None:
            add_options, self._deferred = self._deferred, None
            add_options(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()
