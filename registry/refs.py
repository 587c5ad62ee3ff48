"""Adapter references: ``name``, ``name@3``, ``name:prod`` and ``tenant/name...``, parsed strictly.

A name becomes a directory (local backend) or a repo name (Hub), so the grammar admits nothing that
could escape a directory or be read two ways: lowercase ASCII letters, digits, ``.``, ``_``, ``-``,
starting with a letter or digit, at most 64 characters per part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hotswap.errors import InvalidAdapterRef, quote

MAX_PART_LEN = 64
LATEST = "latest"
_PART = r"[a-z0-9][a-z0-9._-]*"
_PART_RE = re.compile(_PART)
_REF_RE = re.compile(
    rf"(?:(?P<tenant>{_PART})/)?(?P<name>{_PART})(?:@(?P<version>[1-9][0-9]{{0,8}})|:(?P<alias>{_PART}))?"
)


def check_part(value: str, what: str) -> str:
    """Return ``value`` if it is a valid name/tenant/alias part, else raise :class:`InvalidAdapterRef`."""
    if not isinstance(value, str) or not _PART_RE.fullmatch(value) or len(value) > MAX_PART_LEN:
        raise InvalidAdapterRef(
            f"invalid {what} {quote(value)}: use 1-{MAX_PART_LEN} lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_alias(alias: str) -> str:
    """Validate an alias that may be *set* (``latest`` is computed, never stored; digits read as versions)."""
    check_part(alias, "alias")
    if alias == LATEST:
        raise InvalidAdapterRef("alias 'latest' is reserved: it always resolves to the newest version")
    if alias.isdigit():
        raise InvalidAdapterRef(f"alias {quote(alias)} is all digits and would read as a version; pick a word")
    return alias


@dataclass(frozen=True, order=True)
class AdapterRef:
    """A parsed reference. At most one of ``version`` and ``alias`` is set; neither means ``latest``."""

    name: str
    tenant: str | None = None
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        check_part(self.name, "adapter name")
        if self.tenant is not None:
            check_part(self.tenant, "tenant")
        if self.version is not None and self.alias is not None:
            raise InvalidAdapterRef("a reference names either a version (@N) or an alias (:name), not both")
        if self.version is not None and (isinstance(self.version, bool) or self.version < 1):
            raise InvalidAdapterRef(f"version must be a positive integer, got {quote(self.version)}")
        if self.alias is not None:
            check_part(self.alias, "alias")

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse ``[tenant/]name[@version|:alias]``; anything else raises :class:`InvalidAdapterRef`."""
        if not isinstance(text, str):
            raise InvalidAdapterRef(f"adapter reference must be a string, got {type(text).__name__}")
        m = _REF_RE.fullmatch(text)
        if m is None:
            raise InvalidAdapterRef(
                f"invalid adapter reference {quote(text)}: expected [tenant/]name[@version|:alias], "
                "e.g. 'math', 'acme/math@3' or 'math:prod'"
            )
        version = m.group("version")
        return cls(
            name=m.group("name"),
            tenant=m.group("tenant"),
            version=int(version) if version else None,
            alias=m.group("alias"),
        )

    @property
    def full_name(self) -> str:
        """``tenant/name`` or ``name``: the adapter's identity without a version selector."""
        return f"{self.tenant}/{self.name}" if self.tenant else self.name

    def at(self, version: int) -> AdapterRef:
        return AdapterRef(name=self.name, tenant=self.tenant, version=version)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.full_name}@{self.version}"
        if self.alias is not None:
            return f"{self.full_name}:{self.alias}"
        return self.full_name
