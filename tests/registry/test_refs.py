from __future__ import annotations

import pytest

from hotswap.errors import InvalidAdapterRef
from hotswap.registry import AdapterRef
from hotswap.registry.refs import check_alias


@pytest.mark.parametrize(
    ("text", "tenant", "name", "version", "alias"),
    [
        ("math", None, "math", None, None),
        ("math@3", None, "math", 3, None),
        ("math:prod", None, "math", None, "prod"),
        ("acme/math@12", "acme", "math", 12, None),
        ("acme/tone-v2.1_x:staging", "acme", "tone-v2.1_x", None, "staging"),
        ("0day", None, "0day", None, None),
    ],
)
def test_valid_refs_parse_and_round_trip(
    text: str, tenant: str | None, name: str, version: int | None, alias: str | None
) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.tenant, ref.name, ref.version, ref.alias) == (tenant, name, version, alias)
    assert str(ref) == text
    assert AdapterRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        "../x",
        "/abs",
        "a/b/c",
        "Name",
        "a b",
        "a@0",
        "a@01",
        "a@-1",
        "a@x",
        "a:",
        ".hidden",
        "-x",
        "a" * 65,
        "a@1:prod",
        "a\n",
        "tenant/",
        "/name",
        "a@",
        "x/../y",
        "a:Prod",
        "a@99999999999",
    ],
)
def test_invalid_refs_are_refused(text: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        AdapterRef.parse(text)


def test_non_string_ref_is_refused() -> None:
    with pytest.raises(InvalidAdapterRef):
        AdapterRef.parse(3)  # type: ignore[arg-type]


def test_alias_rules() -> None:
    assert check_alias("prod") == "prod"
    for bad in ("latest", "7", "Prod", ""):
        with pytest.raises(InvalidAdapterRef):
            check_alias(bad)
