"""Evaluation commands: eval (refs side by side on held-out data) and the gate of `alias --if-better-than`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap.cli.common import AddCommand, positive_int, registry, table
from hotswap.devices import DTYPE_CHOICES
from hotswap.errors import InvalidArgument
from hotswap.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from hotswap.train.evaluation import Evaluation, Promotion

_SAMPLE_CHARS = 60  # of an answer in the samples table


def _cell(text: str) -> str:
    text = repr(text)[1:-1]  # one line, escapes visible
    return text if len(text) <= _SAMPLE_CHARS else text[: _SAMPLE_CHARS - 1] + "…"


def print_evaluation(result: Evaluation) -> None:
    rows = [
        (s.ref, s.resolved, f"{s.eval_loss:.4f}", f"{s.exact_match:.3f}", f"{s.exact}/{s.examples}")
        for s in result.scores
    ]
    print(table(rows, ("ref", "resolved", "eval loss", "exact match", "exact")))
    if result.expected:
        print()
        samples = [
            (str(i + 1), _cell(expected), *(_cell(s.answers[i]) for s in result.scores))
            for i, expected in enumerate(result.expected)
        ]
        print(table(samples, ("#", "expected", *(s.ref for s in result.scores))))


def cmd_eval(args: argparse.Namespace) -> int:
    from hotswap.train.evaluation import evaluate_refs

    refs = [r.strip() for given in args.refs for r in given.split(",")]
    if any(not r for r in refs):
        raise InvalidArgument(f"refs: an empty entry in {' '.join(args.refs)!r} (use '-' for the base)")
    result = evaluate_refs(
        args.base, refs, args.data, registry=registry(args), samples=args.samples, max_batch=args.max_batch,
        device=args.device, dtype=args.dtype,
    )  # fmt: skip
    print_evaluation(result)
    if args.json is not None:
        atomic_write_bytes(args.json, (json.dumps(asdict(result), indent=2) + "\n").encode())
        print(f"\nwrote {args.json}")
    return 0


def gate(args: argparse.Namespace) -> int:
    """`hotswap alias NAME ALIAS VERSION --if-better-than TARGET --eval DATA --base DIR`."""
    from hotswap.train.evaluation import promote_if_better

    if args.delete or args.version is None:
        raise InvalidArgument("--if-better-than moves an alias to a VERSION: give one (and no --delete)")
    if args.eval is None or args.base is None:
        raise InvalidArgument("--if-better-than needs --eval DATA and --base DIR to score both versions")
    outcome = promote_if_better(registry(args), args.name, args.alias, args.version, args.if_better_than, args.base,
                                args.eval)  # fmt: skip
    _print_promotion(outcome)
    return 0 if outcome.promoted else 1


def _print_promotion(p: Promotion) -> None:
    rows = [
        (role, s.resolved, f"{s.eval_loss:.4f}", f"{s.exact}/{s.examples}")
        for role, s in (("candidate", p.candidate), ("current", p.incumbent))
    ]
    print(table(rows, ("", "version", "eval loss", "exact")))
    if p.promoted:
        was = f" (was {p.previous})" if p.previous is not None else ""
        print(f"{p.name}:{p.alias} -> {p.version}{was}: {p.record['summary']}")
    else:
        print(f"not promoted: {p.record['summary']}; {p.name}:{p.alias} unchanged")


def gate_options(sp: argparse.ArgumentParser) -> None:
    """The `alias` command's gate flags."""
    group = sp.add_argument_group("gated promotion (move the alias only if the version evaluates better)")
    group.add_argument("--if-better-than", metavar="TARGET",
                       help="an alias of NAME (unset: the base), a ref, or '-' for the base: move only if VERSION "
                       "beats it on --eval (exact match, then eval loss); exit 1 when it does not")  # fmt: skip
    group.add_argument("--eval", metavar="DATA", help="held-out JSONL (or builtin:TASK) for --if-better-than")
    group.add_argument("--base", type=Path, help="the base checkpoint both versions are evaluated on")


def register(add: AddCommand) -> None:
    sp = add("eval", cmd_eval, "score refs (and the base) on held-out data, side by side, through the engine")
    sp.add_argument("refs", nargs="+", metavar="REF", help="refs (or comma-separated lists); '-' is the base alone")
    sp.add_argument("--base", required=True, type=Path, help="base checkpoint")
    sp.add_argument("--data", required=True, help="JSONL (prompt/completion, text or messages records) or builtin:TASK")
    sp.add_argument("--samples", type=int, default=3, help="answers shown per ref (default 3)")
    sp.add_argument("--json", type=Path, metavar="FILE", help="also write the scores and samples as JSON")
    sp.add_argument("--max-batch", type=positive_int, default=16, help="rows per batch (default 16)")
    sp.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    sp.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
