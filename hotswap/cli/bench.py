"""``hotswap bench``: run a benchmark scenario, print its Markdown table, write its JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from hotswap.cli.common import AddCommand, positive_float, positive_int
from hotswap.devices import DEVICE_CHOICES, DTYPE_CHOICES
from hotswap.errors import InvalidArgument
from hotswap.quantization import QUANTIZE_CHOICES


def cmd_bench(args: argparse.Namespace) -> int:
    from hotswap.bench import DEFAULT_MODELS, run
    from hotswap.bench.common import Workload
    from hotswap.devices import resolve_device

    try:
        counts = [int(n) for n in args.adapters.split(",")] if args.adapters else None
    except ValueError:
        raise InvalidArgument(f"--adapters must be comma-separated integers, got {args.adapters!r}") from None
    workload = Workload(
        model=args.model or DEFAULT_MODELS.get(args.scenario, "smollm2-135m"),
        batch=args.batch,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        rank=args.rank,
        repeats=args.repeats,
        requests=args.requests,
        soak_seconds=args.minutes * 60,
        api=args.api,
        device=resolve_device(args.device),
        dtype=args.dtype,
        quantize=args.quantize,
        moe=args.moe,
        methods=tuple(dict.fromkeys(args.methods.split(","))) if args.methods else (),  # each once, in order
    )
    path, table = run(args.scenario, workload, args.out, args.cache, counts)
    print(table)
    print(f"\nwrote {path}")
    return 0


# hotswap.bench's SCENARIOS, named here so that `hotswap --help` imports no torch (tests/bench checks they agree)
SCENARIO_NAMES = (
    "mixed",
    "continuous",
    "swap",
    "load",
    "methods",
    "server",
    "train",
    "scale-out",
    "soak",
    "kv",
    "decode",
)


def _model_help() -> str:
    from hotswap.basemodel import PRESETS  # no torch: only the tables
    from hotswap.gguf import PACKAGED

    return (
        f"the base: a preset shape at random init ({', '.join(PRESETS)}; default smollm2-135m = workload W1, tiny "
        f"for soak), or real weights ({'; '.join(f'{name}: {item.note}' for name, item in PACKAGED.items())}; "
        "imported once into ~/.cache/hotswap/bases)"
    )


def register(add: AddCommand) -> None:

    help_ = "run a benchmark scenario (docs/benchmarks.md): Markdown table + JSON"
    sp = add("bench", cmd_bench, help_, registry=False, hub=False)  # its registries live in --cache
    sp.add_argument("scenario", choices=SCENARIO_NAMES)
    sp.add_argument("--out", type=Path, default=Path("bench-results"))
    sp.add_argument("--cache", type=Path, default=Path("bench-results/.cache"), help="built bases and adapters")
    sp.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto = cuda if present")
    sp.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = the base's dtype (float32 on a CPU without bf16)"
    )
    sp.add_argument("--model", metavar="MODEL", help=_model_help())
    sp.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_CHOICES,
        help="the base quantized at load, for the engine and the baselines (mixed adds the float base's row)",
    )
    sp.add_argument("--moe", default="olmoe-mini", help="methods: the MoE preset of its MoE rows, or none")
    sp.add_argument("--methods", help="methods: the methods compared, comma-separated, e.g. lora,dora (default all)")
    sp.add_argument("--batch", type=positive_int, default=16)
    sp.add_argument("--prompt", type=positive_int, default=64)
    sp.add_argument("--new-tokens", type=positive_int, default=32)
    sp.add_argument("--rank", type=positive_int, default=16)
    sp.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds after a warm-up round")
    sp.add_argument("--requests", type=positive_int, default=3000, help="scale-out: requests replayed per routing")
    sp.add_argument("--adapters", help="comma-separated adapter counts N (default per scenario)")
    api_help = "server: grpc clients, or http: the openai package's clients too, beside the gRPC row (same run)"
    sp.add_argument("--api", choices=("grpc", "http"), default="grpc", help=api_help)
    soak_help = "soak: minutes of traffic (default 5; fractions allowed, e.g. 0.05 = 3 s for a smoke run)"
    sp.add_argument("--minutes", type=positive_float, default=5.0, help=soak_help)
