"""The ``hotswap`` command line: the only package that reads argv and prints; one module per command group.

Every failure is one line on stderr and a non-zero exit code from :data:`hotswap.errors.ERROR_TABLE`;
a traceback appears only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from hotswap import __version__
from hotswap.cli import bench, client, evaluate, registry, serve, train
from hotswap.cli.common import Command, Parser
from hotswap.errors import HotswapError, mapping_for
from hotswap.registry import default_registry_url

log = logging.getLogger("hotswap.cli")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="hotswap", description="Adapter registry and hot-swap inference server.")
    p.add_argument("--version", action="version", version=f"hotswap {__version__}")
    p.add_argument(
        "--registry",
        default=None,
        help="registry: hf://ORG (Hugging Face Hub; $HF_ENDPOINT, $HF_TOKEN), a path or file:///path "
        "(default: $HOTSWAP_REGISTRY or ~/.cache/hotswap/registry)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help_: str, *, registry: bool = True, hub: bool = True) -> Parser:
        sp: Parser = sub.add_parser(name, help=help_, description=help_)  # the class of p
        sp.set_defaults(fn=fn)
        if registry:
            sp.add_argument("--registry", default=argparse.SUPPRESS, help="as the global --registry")
        if hub:
            sp.add_argument("--token", dest="hub_token", help="Hugging Face token for hf:// registries ($HF_TOKEN)")
        return sp

    train.register(sub, add)
    evaluate.register(add)
    registry.register(add)
    client.register(add)
    serve.register(add)
    bench.register(add)
    return p


def _quiet_libraries() -> None:
    """Keep CLI output to our own lines: no library progress bars or deprecation chatter."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    # e.g. PEFT on a config written by a newer PEFT ("Unexpected keyword arguments"); -v shows them
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\b")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers honours it too
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # bars transformers draws with tqdm itself (reading GGUF files)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_libraries()
    if getattr(args, "hub_token", None):
        os.environ["HF_TOKEN"] = args.hub_token  # read by the Hub backend (hotswap.registry.hub)
    args.registry_given = args.registry is not None
    if args.registry is None:
        args.registry = default_registry_url()
    try:
        return args.fn(args)
    except HotswapError as e:
        if args.verbose:
            log.exception("failed")
        print(f"hotswap: error: {e}", file=sys.stderr)
        return mapping_for(e).exit_code
    except OSError as e:
        if args.verbose:
            log.exception("failed")
        print(f"hotswap: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hotswap: interrupted", file=sys.stderr)
        return 130
