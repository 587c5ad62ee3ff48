"""Inference commands: generate and health against a running server; compare in-process, in one batch."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap.cli.common import AddCommand, positive_int, registry, table, token_ids
from hotswap.errors import InvalidArgument, ServerUnavailable

if TYPE_CHECKING:
    from hotswap.client import Client


def _client(args: argparse.Namespace) -> Client:
    from hotswap.client import Client

    token = args.token or os.environ.get("HOTSWAP_TOKEN")
    return Client(args.server, token=token, tls_ca=args.tls_ca, timeout=args.timeout, application=args.application)


def _adapter_arg(text: str) -> str | tuple[str, float]:
    ref, sep, weight = text.partition("=")
    if not sep:
        return ref
    try:
        return ref, float(weight)
    except ValueError:
        raise InvalidArgument(f"--adapter {text!r}: the weight after '=' must be a number") from None


def _chat(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """``--chat``: the prompt as one user message, after the ``--system`` messages; None without ``--chat``."""
    if not args.chat:
        if args.system:
            raise InvalidArgument("--system needs --chat")
        return None
    if args.prompt is None:
        raise InvalidArgument("--chat sends the prompt text as a user message: give a prompt (not --prompt-ids)")
    return [*({"role": "system", "content": s} for s in args.system), {"role": "user", "content": args.prompt}]


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise InvalidArgument("give a prompt or --prompt-ids (exactly one)")
    messages = _chat(args)
    params = dict(
        adapters=[_adapter_arg(a) for a in args.adapter],
        prompt_ids=token_ids(args.prompt_ids) if args.prompt_ids is not None else None,
        messages=messages,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    with _client(args) as client:
        if args.stream:
            stream = client.stream(None if messages else args.prompt, **params)
            for chunk in stream:
                if not args.json:
                    print(chunk.text or "".join(f" {t}" for t in chunk.token_ids), end="", flush=True)
            result = stream.response
            if not args.json:
                print()
        else:
            result = client.generate(None if messages else args.prompt, **params)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    elif not args.stream:
        print(result.text if result.text else " ".join(map(str, result.token_ids)))  # type: ignore[union-attr]
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    if status != "SERVING":
        raise ServerUnavailable(f"{args.server} is {status}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hotswap.serve import Engine, Request

    refs = [a.strip() for a in args.adapters.split(",") if a.strip()]
    prompt_ids = token_ids(args.prompt_ids)
    with Engine(args.base, registry(args), max_batch=max(len(refs), 1)) as engine:
        requests = [
            Request(prompt_ids=prompt_ids, adapters=[] if ref == "-" else [ref], max_new_tokens=args.max_new_tokens)
            for ref in refs
        ]
        results = engine.generate(requests)  # submitted together: one batch, one row per adapter
    rows = [
        (
            ref if ref != "-" else "(base)",
            ", ".join(f"{a}" for a, _ in r.adapters) or "-",
            " ".join(map(str, r.token_ids)),
            r.finish_reason,
            f"{r.timings.ttft_s * 1e3:.0f}",
            f"{r.timings.total_s * 1e3:.0f}",
        )
        for ref, r in zip(refs, results, strict=True)
    ]
    print(table(rows, ("adapter", "resolved", "token ids", "finish", "ttft ms", "total ms")))
    return 0


def _client_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--token", help="bearer token (default $HOTSWAP_TOKEN)")
    sp.add_argument("--tls-ca", type=Path, help="PEM CA certificate: connect with TLS")
    sp.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")
    sp.add_argument(
        "--application", help="Ray Serve application to address (needed where Ray runs several, e.g. with --http-port)"
    )


def register(add: AddCommand) -> None:
    # no registry: these talk to a server (their --token is its bearer token)
    sp = add("generate", cmd_generate, "send one generation request to a server", registry=False, hub=False)
    sp.add_argument("prompt", nargs="?", help="prompt text (or --prompt-ids)")
    sp.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    sp.add_argument("--adapter", action="append", default=[], help="REF or REF=WEIGHT; repeat to compose")
    sp.add_argument("--prompt-ids", help="comma-separated token ids instead of text, e.g. 5,17,99")
    sp.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message, in the base's chat template"
    )
    sp.add_argument("--system", action="append", default=[], help="with --chat: a system message first (repeatable)")
    sp.add_argument("--max-new-tokens", type=positive_int)
    sp.add_argument("--temperature", type=float)
    sp.add_argument("--top-k", type=int)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sp.add_argument("--stream", action="store_true", help="print tokens as they come")
    sp.add_argument("--json", action="store_true", help="print the full response (token_ids, usage, timings)")
    _client_options(sp)

    sp = add("health", cmd_health, "check a server's gRPC health (exit 0 when SERVING)", registry=False, hub=False)
    sp.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    sp.add_argument("--service", default="", help="service name (default: the whole server)")
    _client_options(sp)

    sp = add("compare", cmd_compare, "run one prompt through several adapters (and the base) in one batch")
    sp.add_argument("--base", required=True, type=Path, help="base checkpoint to serve")
    sp.add_argument("--adapters", required=True, help="comma-separated refs; '-' is the base model alone")
    sp.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 5,17,99")
    sp.add_argument("--max-new-tokens", type=positive_int, default=8)
