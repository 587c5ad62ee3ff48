"""Registry commands: push, pull, mirror, list, versions, show, alias (and its history)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from hotswap import __version__
from hotswap.cli.common import AddCommand, positive_int, registry, table
from hotswap.cli.evaluate import gate, gate_options
from hotswap.errors import InvalidArgument
from hotswap.quantization import QUANTIZE_CHOICES
from hotswap.registry import AdapterRef, Lineage, Manifest, Registry
from hotswap.registry.artifact import HOTSWAP_CONFIG, PEFT_CONFIG, detect_method
from hotswap.registry.refs import check_alias

# Where an artifact names the base it was made from: PEFT's config, and hotswap's (a "base" field, if any).
_BASE_KEYS = ((PEFT_CONFIG, "base_model_name_or_path"), (HOTSWAP_CONFIG, "base"))


def _declared_base(src: Path) -> Path:
    """The base checkpoint directory the artifact's own config names; refused if it names none on this machine."""
    detect_method(src)  # a missing or broken config is refused as at publish
    for config, key in _BASE_KEYS:
        try:
            named = json.loads((src / config).read_text()).get(key)
        except (OSError, ValueError, AttributeError):  # no such file, not JSON, not an object
            continue
        if not isinstance(named, str):
            continue
        if not Path(named).is_dir():
            raise InvalidArgument(
                f"{src / config} names base {named!r}, which is not a checkpoint directory here: pass --base PATH "
                "(or --no-base to publish for the registry only)"
            )
        return Path(named)
    raise InvalidArgument(
        f"{src} names no base: pass --base PATH (the server refuses an adapter published without a base "
        "fingerprint), or --no-base to publish for the registry only"
    )


def cmd_push(args: argparse.Namespace) -> int:
    base_fp, check = None, None
    if not args.no_base:  # checked against the base before anything is written: what publishes serves
        from hotswap.basemodel import fingerprint
        from hotswap.methods import base_checker
        from hotswap.quantization import check_quantize

        base, quantize = args.base or _declared_base(args.dir), check_quantize(args.quantize)
        base_fp, check = fingerprint(base, quantize), base_checker(base, quantize)
    lineage = Lineage(parent=args.parent, code_version=f"hotswap {__version__}")
    m = registry(args).publish(
        args.dir,
        args.name,
        method=args.method,
        base_fingerprint=base_fp,
        aliases=args.alias,
        lineage=lineage,
        visibility=args.visibility,
        description=args.description,
        check=check,
    )
    suffix = f" (aliases: {', '.join(args.alias)})" if args.alias else ""
    print(f"published {m.ref} [{m.method}, {len(m.files)} files, {m.total_size:,} bytes]{suffix}")
    return 0


def _split_url_ref(args: argparse.Namespace) -> str:
    """``hf://ORG/NAME@3`` names its registry itself: use it, and return the plain ref ``NAME@3``."""
    text = args.ref
    if text.startswith("hf://"):
        org, sep, ref = text.removeprefix("hf://").partition("/")
        if not sep or not org:
            raise InvalidArgument(f"{text!r}: expected hf://ORG/NAME[@VERSION|:ALIAS]")
        args.registry = f"hf://{org}"
        return ref
    return text


def cmd_pull(args: argparse.Namespace) -> int:
    text = _split_url_ref(args)
    reg = registry(args)
    ref = AdapterRef.parse(text)
    dest = args.to or Path(f"{ref.name}-v{reg.resolve(ref).version}")
    m = reg.pull(ref, dest)
    print(f"pulled {m.ref} to {dest} (verified {len(m.files)} files)")
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    src, dst = Registry(args.source), Registry(args.dest)
    copied = dst.mirror(src, args.name or None)
    for m in copied:
        print(f"copied {m.ref} [{m.method}] {src.url} -> {dst.url}")
    print(f"{len(copied)} version(s) copied; aliases in sync")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reg = registry(args)
    items = reg.list()
    if args.json:
        print(json.dumps([asdict(i) for i in items], indent=2))
    elif not items:
        print(f"no adapters in {reg.url}")
    else:
        rows = [
            (
                i.name,
                i.latest,
                i.versions,
                i.method,
                ", ".join(f"{a}={v}" for a, v in sorted(i.aliases.items())) or "-",
                i.visibility,
                i.created_at,
            )
            for i in items
        ]
        print(table(rows, ("name", "latest", "versions", "method", "aliases", "visibility", "created")))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    reg = registry(args)
    manifests = reg.versions(args.name)
    aliases = reg.aliases(args.name)
    if args.json:
        print(json.dumps([json.loads(m.to_json()) for m in manifests], indent=2))
        return 0
    rows = [
        (
            m.version,
            m.method,
            ", ".join(sorted(a for a, v in aliases.items() if v == m.version)) or "-",
            f"{m.total_size:,}",
            m.created_at,
            (m.base_fingerprint or "-")[:19],
        )
        for m in manifests
    ]
    print(table(rows, ("version", "method", "aliases", "bytes", "created", "base")))
    return 0


def _print_manifest(m: Manifest, aliases: dict[str, int]) -> None:
    pointing = sorted(a for a, v in aliases.items() if v == m.version)
    fields = [
        ("name", m.name),
        ("version", m.version),
        ("method", m.method),
        ("base", m.base_fingerprint or "(none recorded)"),
        ("created", m.created_at),
        ("visibility", m.visibility + (f" (tenant {m.tenant})" if m.tenant else "")),
        ("aliases", ", ".join(pointing) or "-"),
        ("size", f"{m.total_size:,} bytes in {len(m.files)} files"),
    ]
    if m.description:
        fields.append(("description", m.description))
    lineage = {k: v for k, v in asdict(m.lineage).items() if v is not None}
    for key, value in lineage.items():
        fields.append((f"lineage.{key}", json.dumps(value) if isinstance(value, dict) else value))
    for key, value in sorted(m.metrics.items()):
        fields.append((f"metrics.{key}", value))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    print()
    print(table([(p, f"{e.size:,}", e.sha256[:16]) for p, e in m.files.items()], ("file", "bytes", "sha256")))


def cmd_show(args: argparse.Namespace) -> int:
    reg = registry(args)
    m = reg.resolve(args.ref)
    if args.json:
        print(m.to_json(), end="")
    else:
        _print_manifest(m, reg.aliases(m.name))
    return 0


_SUMMARY_WIDTH = 60  # characters of a record shown in the history table


def _record_summary(record: object) -> str:
    """A record's ``summary`` string if it has one, else its JSON, cut to one short table cell."""
    if record is None:
        return "-"
    summary = record.get("summary") if isinstance(record, dict) else None
    text = summary if isinstance(summary, str) else json.dumps(record, separators=(",", ":"))
    text = " ".join(text.split())  # one line
    return text if len(text) <= _SUMMARY_WIDTH else text[: _SUMMARY_WIDTH - 1] + "…"


def _move(entry: dict) -> str:
    """``2 -> 3``; ``- -> 1`` for a new alias; ``3 -> deleted``."""
    previous, version = entry.get("previous"), entry.get("version")
    return f"{'-' if previous is None else previous} -> {'deleted' if version is None else version}"


def _print_history(reg: Registry, args: argparse.Namespace) -> int:
    if args.version is not None or args.delete:
        raise InvalidArgument("alias --history takes no VERSION or --delete: it only shows past moves")
    entries = reg.alias_history(args.name)
    if args.alias is not None:
        check_alias(args.alias)
        entries = [e for e in entries if e["alias"] == args.alias]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        which = f"{args.name}:{args.alias}" if args.alias is not None else args.name
        print(f"no alias moves recorded for {which}")
        return 0
    rows = [(e.get("at", "?"), e["alias"], _move(e), _record_summary(e.get("record"))) for e in entries]
    print(table(rows, ("at", "alias", "move", "record")))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    reg = registry(args)
    if args.history:
        return _print_history(reg, args)
    if args.alias is None:
        raise InvalidArgument("alias needs an ALIAS (and a VERSION, or --delete), or --history")
    if args.json:
        raise InvalidArgument("--json goes with --history")
    if args.delete:
        reg.delete_alias(args.name, args.alias)
        print(f"deleted alias {args.name}:{args.alias}")
        return 0
    if args.if_better_than is not None:
        return gate(args)
    if args.eval is not None or args.base is not None:
        raise InvalidArgument("--eval and --base go with --if-better-than")
    if args.version is None:
        raise InvalidArgument("alias needs a VERSION to point at (or --delete to remove it)")
    before = reg.aliases(args.name).get(args.alias)
    m = reg.set_alias(args.name, args.alias, args.version)
    moved = f" (was {before})" if before is not None and before != m.version else ""
    print(f"{m.name}:{args.alias} -> {m.version}{moved}")
    return 0


def register(add: AddCommand) -> None:
    sp = add("push", cmd_push, "publish an adapter directory as a new immutable version")
    sp.add_argument("dir", type=Path)
    sp.add_argument("--name", required=True, help="adapter name, optionally tenant/name")
    fits = sp.add_mutually_exclusive_group()
    fits.add_argument(
        "--base",
        type=Path,
        help="base checkpoint the adapter is for: records its fingerprint and refuses an artifact that does not fit "
        "it (default: the local directory the adapter's config names, e.g. PEFT's base_model_name_or_path)",
    )
    fits.add_argument(
        "--no-base", action="store_true", help="record no base: for the registry only, the server refuses it"
    )
    sp.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_CHOICES,
        help="publish for the base quantized at load this way (serve --quantize): its fingerprint names the "
        "quantization, and an adapter serves only on the base it was published for",
    )
    sp.add_argument("--alias", action="append", default=[], help="move this alias to the new version (repeatable)")
    sp.add_argument("--method", help="override the method detected from the config (e.g. plora)")
    sp.add_argument("--visibility", choices=("public", "private"), help="default: private for tenant/name")
    sp.add_argument("--parent", help="lineage: the version this one was fine-tuned from, e.g. math@2")
    sp.add_argument("--description", default="")

    sp = add("pull", cmd_pull, "copy a verified version to a local directory")
    sp.add_argument("ref", help="name, name@N or name:alias")
    sp.add_argument("--to", type=Path, help="new directory (default: ./NAME-vN)")

    sp = add("mirror", cmd_mirror, "copy versions (numbers, manifests, aliases) between registries", registry=False)
    sp.add_argument("source", help="registry URL or path to copy from (e.g. ./registry)")
    sp.add_argument("dest", help="registry URL or path to copy to (e.g. hf://my-org)")
    sp.add_argument("name", nargs="*", help="adapters to mirror (default: all)")

    sp = add("list", cmd_list, "list adapters")
    sp.add_argument("--json", action="store_true")

    sp = add("versions", cmd_versions, "list the versions of an adapter")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")

    sp = add("show", cmd_show, "show a version's manifest")
    sp.add_argument("ref")
    sp.add_argument("--json", action="store_true")

    sp = add("alias", cmd_alias, "point an alias at a version (rollback = point it back), or show its history")
    sp.add_argument("name")
    sp.add_argument("alias", nargs="?", help="required unless --history (which it then filters)")
    sp.add_argument("version", nargs="?", type=positive_int)
    sp.add_argument("--delete", action="store_true", help="remove the alias")
    sp.add_argument(
        "--history", action="store_true", help="show every recorded alias move of NAME (or of ALIAS), oldest first"
    )
    sp.add_argument("--json", action="store_true", help="with --history: print the entries as JSON")
    gate_options(sp)
