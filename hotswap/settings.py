"""Settings by field name: the flat view of configuration dataclasses (``ServerConfig`` with its
``EngineConfig``, ``RayOptions``) that ``hotswap serve``'s flags, its ``--config`` TOML and Ray Serve's
``build_app`` args share, as transformers' ``HfArgumentParser`` reads dataclasses.

A field's ``metadata`` holds its ``help`` and, where needed:

- ``flag``: the flag's name when it differs from the field's (``grace`` for ``grace_seconds``); also
  accepted as a key, so older config files keep working;
- ``choices``: the values allowed;
- ``build_app: False``: not a ``build_app`` arg (a Ray Serve config sets it itself: ports, proxies, TLS);
- ``setting: False``: not a setting at all (derived from another one, e.g. Ray's gRPC port from ``port``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hotswap.errors import InvalidArgument

T = TypeVar("T")
_ACCEPTED: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
    Path: (str, Path),
}
_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}


@dataclass(frozen=True)
class Setting:
    """One field of a configuration dataclass, as a flag and a key."""

    name: str  # the field's name: the key in a TOML file or build_app's args
    owner: type  # the dataclass the field belongs to
    kind: type  # bool, int, float, str or Path
    optional: bool  # the field's type allows None
    default: Any  # dataclasses.MISSING where the field has none
    help: str
    flag: str  # without its leading dashes (ray-address); the field's name unless its metadata says otherwise
    choices: tuple[str, ...] | None = None
    build_app: bool = True

    @property
    def alias(self) -> str:
        """The flag's name as a key (``grace``): the field's name, or the older key of a renamed field."""
        return self.flag.replace("-", "_")

    def check(self, value: object, source: str) -> Any:
        """``value`` as this field's type; a value of another type (or outside ``choices``) is refused."""
        if value is None and self.optional:
            return None
        if not isinstance(value, _ACCEPTED[self.kind]) or (self.kind is not bool and isinstance(value, bool)):
            raise InvalidArgument(f"{source}: {self.name} must be {_KIND[self.kind]}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise InvalidArgument(f"{source}: {self.name} must be one of {', '.join(self.choices)}, got {value!r}")
        return self.kind(value)


def settings_of(*classes: type) -> dict[str, Setting]:
    """Every field of ``classes`` by name, a nested dataclass's fields (``ServerConfig.engine``) in its place."""
    out: dict[str, Setting] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                found = settings_of(hint)
            elif f.metadata.get("setting", True):
                found = {f.name: _setting(cls, f, hint)}
            else:
                continue
            if clash := set(found) & set(out):
                raise ValueError(f"settings {sorted(clash)} defined twice")
            out.update(found)
    return out


def _setting(cls: type, f: dataclasses.Field, hint: Any) -> Setting:
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in _ACCEPTED:
        raise TypeError(f"{cls.__name__}.{f.name}: a setting is bool, int, float, str or Path, not {hint}")
    choices = f.metadata.get("choices")
    return Setting(
        name=f.name,
        owner=cls,
        kind=kinds[0],
        optional=type(None) in typing.get_args(hint),
        default=f.default,
        help=f.metadata["help"],
        flag=f.metadata.get("flag", f.name).replace("_", "-"),
        choices=tuple(choices) if choices is not None else None,
        build_app=f.metadata.get("build_app", True),
    )


def normalize(values: Mapping[str, object], settings: Mapping[str, Setting], source: str) -> dict[str, Any]:
    """``values`` by field name, each checked against its field's type: a renamed field's flag name is accepted as
    its key too, an unknown key is refused."""
    by_key = {**{s.alias: s for s in settings.values()}, **settings}
    if unknown := sorted(set(values) - set(by_key)):
        raise InvalidArgument(f"{source}: unknown keys {unknown}; known: {sorted(settings)}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        setting = by_key[key]
        if setting.name in out:
            raise InvalidArgument(f"{source}: {setting.alias} and {setting.name} are one setting")
        out[setting.name] = setting.check(value, source)
    return out


def build(cls: type[T], values: Mapping[str, Any], source: str) -> T:
    """An instance of ``cls`` (nested dataclasses too) from ``values`` by field name; a field not in ``values``
    keeps its default, and one without a default must be there."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, source)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidArgument(f"{source}: {f.name} is required")
    return cls(**kwargs)
