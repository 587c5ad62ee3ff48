"""The ``hotswap`` command line. The only module that reads argv and prints.

Every failure is one line on stderr and a non-zero exit code from :data:`hotswap.errors.ERROR_TABLE`;
a traceback appears only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap import __version__
from hotswap.errors import HotswapError, InvalidArgument, mapping_for
from hotswap.registry import AdapterRef, Lineage, Manifest, Registry, default_registry_url

if TYPE_CHECKING:
    import threading

    from hotswap.serve.server import ServerConfig

log = logging.getLogger("hotswap.cli")


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
    print(_table([(p, f"{e.size:,}", e.sha256[:16]) for p, e in m.files.items()], ("file", "bytes", "sha256")))


# -- commands ------------------------------------------------------------------------------------
def cmd_base_build(args: argparse.Namespace) -> int:
    from hotswap.basemodel import build_model, build_with_tokenizer, fingerprint, save_model

    overrides = {"initializer_range": args.initializer_range} if args.initializer_range is not None else {}
    if args.tokenizer:
        model, tokenizer = build_with_tokenizer(args.preset, args.tokenizer, seed=args.seed, **overrides)
    else:
        model, tokenizer = build_model(args.preset, seed=args.seed, **overrides), None
    out = save_model(model, args.out, tokenizer)
    with_tok = f", tokenizer {args.tokenizer} (vocab {len(tokenizer)})" if tokenizer is not None else ""
    print(f"built base '{args.preset}' (seed {args.seed}{with_tok}) at {out}")
    print(f"fingerprint {fingerprint(out)}")
    return 0


def cmd_base_fingerprint(args: argparse.Namespace) -> int:
    from hotswap.basemodel import fingerprint

    print(fingerprint(args.path))
    return 0


def cmd_adapter_random(args: argparse.Namespace) -> int:
    from hotswap.train import RandomLoraConfig, random_lora

    config = RandomLoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(t for t in args.targets.split(",") if t),
        use_dora=args.dora,
        seed=args.seed,
        init_std=args.init_std,
    )
    out = random_lora(args.base, args.out, config)
    print(f"wrote random {'DoRA' if args.dora else 'LoRA'} adapter r={args.rank} (seed {args.seed}) to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hotswap.train import TrainConfig, train

    given = {
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "target_modules": tuple(t for t in args.targets.split(",") if t) if args.targets else None,
        "num_virtual_tokens": args.virtual_tokens,
        "init_rank": args.init_rank,
        "target_rank": args.target_rank,
        "orth_reg_weight": args.orth_reg_weight,
        "bottleneck_dim": args.bottleneck_dim,
        "activation": args.activation,
        "placement": args.placement,
        "density": args.density,
        "fisher_batches": args.fisher_batches,
        "variant": args.variant,
        "period": args.period,
        "momentum": args.momentum,
        "export": args.plora_export,
        "svd_rank": args.svd_rank,
        "small_model": str(args.small_model) if args.small_model else None,
    }
    config = TrainConfig(
        method=args.method,
        options={k: v for k, v in given.items() if v is not None},
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.alias and not args.push:
        raise InvalidArgument("--alias needs --push NAME")
    out = args.out or Path("runs") / f"{(args.push or args.method).replace('/', '-')}-s{args.seed}"
    result = train(
        config,
        args.base,
        args.data,
        out,
        eval_data=args.eval,
        push=args.push,
        registry=args.registry,
        aliases=args.alias,
        visibility=args.visibility,
        description=args.description,
        parent=args.parent,
        quiet=args.quiet,
    )
    m = result.metrics
    print(
        f"trained {args.method}: eval loss {m['eval_loss_untrained']:.4f} -> {m['eval_loss']:.4f}, "
        f"eval accuracy {m['eval_accuracy_untrained']:.3f} -> {m['eval_accuracy']:.3f}, "
        f"{m['trainable_params']:,} trainable parameters ({m['trainable_pct']:.3f}%), {m['wall_seconds']:.1f} s"
    )
    print(f"artifact {result.artifact}, loss curve {out / 'loss_curve.csv'} and .png")
    if result.manifest is not None:
        suffix = f" (aliases: {', '.join(args.alias)})" if args.alias else ""
        print(f"published {result.manifest.ref}{suffix}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    base_fp, check = None, None
    if args.base:  # checked against the base before anything is written: what publishes serves
        from hotswap.basemodel import fingerprint
        from hotswap.serve.adapters import base_checker

        base_fp, check = fingerprint(args.base), base_checker(args.base)
    lineage = Lineage(parent=args.parent, code_version=f"hotswap {__version__}")
    m = _registry(args).publish(
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
    reg = _registry(args)
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
    items = _registry(args).list()
    if args.json:
        print(json.dumps([asdict(i) for i in items], indent=2))
    elif not items:
        print(f"no adapters in {_registry(args).url}")
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
        print(_table(rows, ("name", "latest", "versions", "method", "aliases", "visibility", "created")))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    reg = _registry(args)
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
    print(_table(rows, ("version", "method", "aliases", "bytes", "created", "base")))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    m = reg.resolve(args.ref)
    if args.json:
        print(m.to_json(), end="")
    else:
        _print_manifest(m, reg.aliases(m.name))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.delete:
        reg.delete_alias(args.name, args.alias)
        print(f"deleted alias {args.name}:{args.alias}")
        return 0
    if args.version is None:
        raise InvalidArgument("alias needs a VERSION to point at (or --delete to remove it)")
    before = reg.aliases(args.name).get(args.alias)
    m = reg.set_alias(args.name, args.alias, args.version)
    moved = f" (was {before})" if before is not None and before != m.version else ""
    print(f"{m.name}:{args.alias} -> {m.version}{moved}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hotswap.serve import Engine, Request

    refs = [a.strip() for a in args.adapters.split(",") if a.strip()]
    try:
        prompt_ids = [int(t) for t in args.prompt_ids.split(",")]
    except ValueError:
        raise InvalidArgument(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    with Engine(args.base, _registry(args), max_batch=max(len(refs), 1)) as engine:
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
    print(_table(rows, ("adapter", "resolved", "token ids", "finish", "ttft ms", "total ms")))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from hotswap.bench import DEFAULT_MODELS, run
    from hotswap.bench.common import Workload

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
        device=args.device,
    )
    path, table = run(args.scenario, workload, args.out, args.cache, counts)
    print(table)
    print(f"\nwrote {path}")
    return 0


# Defaults of `hotswap serve`; a --config TOML file may set any of these keys, and flags override it.
SERVE_DEFAULTS: dict[str, object] = {
    "base": None,
    "host": "127.0.0.1",
    "port": 50051,
    "metrics_port": 9090,
    "max_batch": 32,
    "max_queue": 256,
    "max_resident": 16,
    "max_seq_len": 1024,
    "device": "cpu",
    "dtype": "float32",
    "auth": None,
    "no_auth": False,
    "tls_cert": None,
    "tls_key": None,
    "grace": 30.0,
    "max_adapter_labels": 100,
    "log_level": "info",
    "ray": False,
    "replicas": 2,
    "ray_address": None,
    "replica_cpus": 1.0,
    "ray_http_port": 8000,
    "adapters_per_replica": 64,
}
_PATH_KEYS = ("base", "auth", "tls_cert", "tls_key")


def _serve_settings(args: argparse.Namespace) -> dict[str, object]:
    """Flags over the --config file over SERVE_DEFAULTS."""
    import tomllib

    from_file: dict[str, object] = {}
    if args.config:
        try:
            from_file = tomllib.loads(Path(args.config).read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"config {args.config} is not valid TOML: {e}") from None
        unknown = sorted(set(from_file) - set(SERVE_DEFAULTS) - {"registry"})
        if unknown:
            raise InvalidArgument(f"config {args.config}: unknown keys {unknown}; known: {sorted(SERVE_DEFAULTS)}")
    settings = {}
    for key, default in SERVE_DEFAULTS.items():
        flag = getattr(args, key)
        settings[key] = flag if flag is not None else from_file.get(key, default)
    for key in _PATH_KEYS:
        settings[key] = Path(str(settings[key])) if settings[key] is not None else None
    if settings["base"] is None:
        raise InvalidArgument("serve needs --base PATH (or base = ... in --config)")
    if "registry" in from_file and not args.registry_given:
        args.registry = str(from_file["registry"])
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from hotswap.serve import EngineConfig
    from hotswap.serve.server import Server, ServerConfig

    s = _serve_settings(args)
    logging.getLogger("hotswap").setLevel(str(s["log_level"]).upper())
    config = ServerConfig(
        base=s["base"],  # type: ignore[arg-type]
        registry=args.registry,
        host=str(s["host"]),
        port=int(s["port"]),  # type: ignore[call-overload]
        metrics_port=int(s["metrics_port"]),  # type: ignore[call-overload]
        auth=s["auth"],  # type: ignore[arg-type]
        no_auth=bool(s["no_auth"]),
        tls_cert=s["tls_cert"],  # type: ignore[arg-type]
        tls_key=s["tls_key"],  # type: ignore[arg-type]
        grace_seconds=float(s["grace"]),  # type: ignore[arg-type]
        max_adapter_labels=int(s["max_adapter_labels"]),  # type: ignore[call-overload]
        engine=EngineConfig(
            max_batch=int(s["max_batch"]),  # type: ignore[call-overload]
            max_queue=int(s["max_queue"]),  # type: ignore[call-overload]
            max_resident=int(s["max_resident"]),  # type: ignore[call-overload]
            max_seq_len=int(s["max_seq_len"]),  # type: ignore[call-overload]
            device=str(s["device"]),
            dtype=str(s["dtype"]),
        ),
    )
    stop = threading.Event()
    _stop_on_signals(stop)
    if s["ray"]:
        return _serve_ray(config, s, stop)
    server = Server(config).open()
    try:
        server.load()
    except BaseException:
        server.stop(grace=0)
        raise
    metrics = f", metrics http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    print(f"hotswap: serving {config.base} on {config.host}:{server.port}{metrics}", flush=True)
    while not stop.wait(0.2):  # the signal handler runs between waits
        pass
    print(f"hotswap: shutting down (grace {config.grace_seconds:g} s)", flush=True)
    server.stop()
    return 0


def _stop_on_signals(stop: threading.Event) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def _serve_ray(config: ServerConfig, s: dict[str, object], stop: threading.Event) -> int:
    """``serve --ray``: deploy on Ray Serve, wait for SIGTERM/SIGINT, then delete the application."""
    try:
        from hotswap.serve import scaleout
    except ImportError as e:
        raise InvalidArgument(f"--ray needs the ray extra (pip install 'hotswap[ray]'): {e}") from None
    if config.tls_cert is not None:
        raise InvalidArgument("--ray serves through Ray Serve's gRPC proxy, which has no TLS: terminate TLS before it")
    options = scaleout.RayOptions(
        replicas=int(s["replicas"]),  # type: ignore[call-overload]
        address=None if s["ray_address"] is None else str(s["ray_address"]),
        grpc_port=config.port,
        http_port=int(s["ray_http_port"]),  # type: ignore[call-overload]
        replica_cpus=float(s["replica_cpus"]),  # type: ignore[arg-type]
        adapters_per_replica=int(s["adapters_per_replica"]),  # type: ignore[call-overload]
    )
    scaleout.start(config, options)
    _stop_on_signals(stop)  # ray.init installed its own handlers
    print(f"hotswap: serving {config.base} on Ray Serve, {options.replicas} replicas, "
          f"gRPC proxy port {options.grpc_port}", flush=True)  # fmt: skip
    while not stop.wait(0.2):  # the signal handler runs between waits
        pass
    print("hotswap: shutting down (deleting the Ray Serve application)", flush=True)
    scaleout.stop()
    return 0


def _client(args: argparse.Namespace):
    from hotswap.client import Client

    return Client(
        args.server, token=args.token or os.environ.get("HOTSWAP_TOKEN"), tls_ca=args.tls_ca, timeout=args.timeout
    )


def _adapter_arg(text: str) -> str | tuple[str, float]:
    ref, sep, weight = text.partition("=")
    if not sep:
        return ref
    try:
        return ref, float(weight)
    except ValueError:
        raise InvalidArgument(f"--adapter {text!r}: the weight after '=' must be a number") from None


def cmd_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise InvalidArgument("give a prompt or --prompt-ids (exactly one)")
    prompt_ids = None
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise InvalidArgument(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    params = dict(
        adapters=[_adapter_arg(a) for a in args.adapter],
        prompt_ids=prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    with _client(args) as client:
        if args.stream:
            stream = client.stream(args.prompt, **params)
            for chunk in stream:
                if not args.json:
                    print(chunk.text or "".join(f" {t}" for t in chunk.token_ids), end="", flush=True)
            result = stream.response
            if not args.json:
                print()
        else:
            result = client.generate(args.prompt, **params)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    elif not args.stream:
        print(result.text if result.text else " ".join(map(str, result.token_ids)))  # type: ignore[union-attr]
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from hotswap.errors import ServerUnavailable

    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    if status != "SERVING":
        raise ServerUnavailable(f"{args.server} is {status}")
    return 0


# -- parser --------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _client_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--token", help="bearer token (default $HOTSWAP_TOKEN)")
    sp.add_argument("--tls-ca", type=Path, help="PEM CA certificate: connect with TLS")
    sp.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hotswap", description="Adapter registry and hot-swap inference server.")
    p.add_argument("--version", action="version", version=f"hotswap {__version__}")
    p.add_argument(
        "--registry",
        default=None,
        help="registry: hf://ORG (Hugging Face Hub; $HF_ENDPOINT, $HF_TOKEN), a path or file:///path "
        "(default: $HOTSWAP_REGISTRY or ~/.cache/hotswap/registry)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("--registry", default=argparse.SUPPRESS, help="as the global --registry")
        if name not in ("generate", "health"):  # there --token is the server's bearer token
            sp.add_argument("--token", dest="hub_token", help="Hugging Face token for hf:// registries ($HF_TOKEN)")
        return sp

    base = sub.add_parser("base", help="build and fingerprint base models")
    base_sub = base.add_subparsers(dest="base_command", required=True, metavar="ACTION")
    sp = base_sub.add_parser("build", help="build a random-init base checkpoint from a preset shape")
    sp.add_argument("--preset", default="tiny", help="tiny (tests) or smollm2-135m (benchmarks)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tokenizer", help="bundle a tokenizer (name 'minilm' or a directory); sets the vocabulary")
    sp.add_argument("--initializer-range", type=float, help="std of the random weights (default: the config's, 0.02)")
    sp.add_argument("--out", required=True, type=Path, help="new directory for the checkpoint")
    sp.set_defaults(fn=cmd_base_build)
    sp = base_sub.add_parser("fingerprint", help="print a checkpoint's base fingerprint")
    sp.add_argument("path", type=Path)
    sp.set_defaults(fn=cmd_base_fingerprint)

    adapter = sub.add_parser("adapter", help="create adapter artifacts without training")
    adapter_sub = adapter.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")
    sp = adapter_sub.add_parser("random", help="a PEFT LoRA/DoRA adapter with random non-zero weights")
    sp.add_argument("--base", required=True, type=Path)
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--rank", type=_positive_int, default=8)
    sp.add_argument("--alpha", type=float, default=16.0)
    sp.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    sp.add_argument("--dora", action="store_true")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--init-std", type=float, default=0.02, help="std of the random A and B entries")
    sp.set_defaults(fn=cmd_adapter_random)

    sp = add("train", cmd_train, "train an adapter on a frozen base, evaluate it, and optionally publish it")
    sp.add_argument(
        "--method",
        required=True,
        help="lora, dora, adalora, dylora, plora, bitfit, prefix, prompt, bottleneck, fishmask, child-tuning or proxy",
    )
    sp.add_argument("--base", required=True, type=Path, help="base checkpoint directory")
    sp.add_argument("--data", required=True, help="JSONL file or builtin:TASK (mapping, reverse, modadd)")
    sp.add_argument("--eval", help="evaluation data (default: a fresh draw of a built-in task, else every 10th record)")
    sp.add_argument("--out", type=Path, help="run directory for adapter/ and the loss curve (default runs/NAME-sSEED)")
    sp.add_argument("--push", metavar="NAME", help="publish the result as a new version of NAME")
    sp.add_argument("--alias", action="append", default=[], help="with --push: move this alias to it (repeatable)")
    sp.add_argument("--visibility", choices=("public", "private"), help="with --push (default: by the name)")
    sp.add_argument("--description", default="")
    sp.add_argument("--parent", help="continue from this published version (same method), e.g. math@2")
    sp.add_argument("--steps", type=_positive_int, help="optimizer steps (default 200)")
    sp.add_argument("--epochs", type=float, help="passes over the data, instead of --steps")
    sp.add_argument("--lr", type=float, help="learning rate (default per method)")
    sp.add_argument("--batch-size", type=_positive_int, default=16)
    sp.add_argument("--eval-every", type=_positive_int, default=50)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory, slower"
    )
    sp.add_argument("--rank", type=_positive_int, help="lora/dora/dylora/plora: rank r (default 8)")
    sp.add_argument("--alpha", type=float, help="lora-family: alpha (default 16); proxy: offset strength (1)")
    sp.add_argument("--dropout", type=float, help="lora/dora: dropout (default 0)")
    sp.add_argument("--targets", help="comma-separated module names (default: all seven linears of a block)")
    sp.add_argument("--virtual-tokens", dest="virtual_tokens", type=_positive_int, help="prefix/prompt (default 8)")
    sp.add_argument("--init-rank", type=_positive_int, help="adalora: starting rank of every layer (12)")
    sp.add_argument("--target-rank", type=_positive_int, help="adalora: average final rank (8)")
    sp.add_argument("--orth-reg-weight", type=float, help="adalora: orthogonality penalty (0.5)")
    sp.add_argument("--bottleneck-dim", type=_positive_int, help="bottleneck: hidden size m (default 16)")
    sp.add_argument("--activation", choices=("relu", "gelu", "silu"), help="bottleneck: nonlinearity (relu)")
    sp.add_argument("--placement", choices=("serial", "parallel"), help="bottleneck: after or beside the sublayer")
    sp.add_argument("--density", type=float, help="fishmask/child-tuning: share of weights trained (0.005/0.2)")
    sp.add_argument("--fisher-batches", type=_positive_int, help="fishmask/child-tuning: batches for Fisher (8)")
    sp.add_argument("--variant", choices=("d", "f"), help="child-tuning: d = Fisher-selected (default), f = random")
    sp.add_argument("--period", type=_positive_int, help="plora: steps between offloads into the backbone (50)")
    sp.add_argument("--momentum", type=float, help="plora: share of A, B kept at each offload (default 0)")
    sp.add_argument("--plora-export", choices=("stacked", "svd"), help="plora: exact stacked factors or SVD")
    sp.add_argument("--svd-rank", type=_positive_int, help="plora with --plora-export svd: rank kept (default r)")
    sp.add_argument("--small-model", type=Path, help="proxy: small checkpoint sharing the base's vocabulary")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("push", cmd_push, "publish an adapter directory as a new immutable version")
    sp.add_argument("dir", type=Path)
    sp.add_argument("--name", required=True, help="adapter name, optionally tenant/name")
    sp.add_argument(
        "--base",
        type=Path,
        help="base checkpoint the adapter is for: records its fingerprint and refuses an artifact that does not fit it",
    )
    sp.add_argument("--alias", action="append", default=[], help="move this alias to the new version (repeatable)")
    sp.add_argument("--method", help="override the method detected from the config (e.g. plora)")
    sp.add_argument("--visibility", choices=("public", "private"), help="default: private for tenant/name")
    sp.add_argument("--parent", help="lineage: the version this one was fine-tuned from, e.g. math@2")
    sp.add_argument("--description", default="")

    sp = add("pull", cmd_pull, "copy a verified version to a local directory")
    sp.add_argument("ref", help="name, name@N or name:alias")
    sp.add_argument("--to", type=Path, help="new directory (default: ./NAME-vN)")

    sp = add("mirror", cmd_mirror, "copy versions (numbers, manifests, aliases) between registries")
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

    sp = add("compare", cmd_compare, "run one prompt through several adapters (and the base) in one batch")
    sp.add_argument("--base", required=True, type=Path, help="base checkpoint to serve")
    sp.add_argument("--adapters", required=True, help="comma-separated refs; '-' is the base model alone")
    sp.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 5,17,99")
    sp.add_argument("--max-new-tokens", type=_positive_int, default=8)

    sp = add("bench", cmd_bench, "run a benchmark scenario (see README, Benchmarks): Markdown table + JSON")
    sp.add_argument("scenario", choices=("mixed", "swap", "load", "methods", "server", "train", "scale-out", "soak"))
    sp.add_argument("--out", type=Path, default=Path("bench-results"))
    sp.add_argument("--cache", type=Path, default=Path("bench-results/.cache"), help="built bases and adapters")
    sp.add_argument("--device", default="cpu", help="cpu or cuda")
    sp.add_argument("--model", help="base preset (default smollm2-135m, workload W1; tiny for soak)")
    sp.add_argument("--batch", type=_positive_int, default=16)
    sp.add_argument("--prompt", type=_positive_int, default=64)
    sp.add_argument("--new-tokens", type=_positive_int, default=32)
    sp.add_argument("--rank", type=_positive_int, default=16)
    sp.add_argument("--repeats", type=_positive_int, default=3)
    sp.add_argument("--requests", type=_positive_int, default=3000, help="scale-out: requests replayed per routing")
    sp.add_argument("--adapters", help="comma-separated adapter counts N (default per scenario)")
    soak_help = "soak: minutes of traffic (default 5; fractions allowed, e.g. 0.05 = 3 s for a smoke run)"
    sp.add_argument("--minutes", type=_positive_float, default=5.0, help=soak_help)

    sp = add("serve", cmd_serve, "serve the base and the registry's adapters over gRPC (until SIGTERM/SIGINT)")
    sp.add_argument("--config", type=Path, help="TOML file with any of the options below (flags win)")
    sp.add_argument("--base", help="base checkpoint directory")
    sp.add_argument("--host", help="listen address (default 127.0.0.1)")
    sp.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    sp.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9090; 0 = any free)")
    sp.add_argument("--max-batch", type=_positive_int, help="rows decoded together (default 32)")
    sp.add_argument("--max-queue", type=_positive_int, help="waiting requests before RESOURCE_EXHAUSTED (default 256)")
    sp.add_argument("--max-resident", type=_positive_int, help="adapters resident in slots (default 16)")
    sp.add_argument("--max-seq-len", type=_positive_int, help="prompt + generated tokens per request (default 1024)")
    sp.add_argument("--device", help="cpu (default) or cuda")
    sp.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    sp.add_argument("--auth", help="tokens file (TOML, see README) mapping bearer tokens to tenants and roles")
    sp.add_argument("--no-auth", action="store_true", default=None, help="serve without authentication")
    sp.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    sp.add_argument("--tls-key", help="PEM private key")
    sp.add_argument("--grace", type=float, help="seconds in-flight requests get to finish on shutdown (default 30)")
    sp.add_argument("--max-adapter-labels", type=_positive_int, help="adapter label values in metrics (default 100)")
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    sp.add_argument("--ray", action="store_true", default=None, help="serve on Ray Serve replicas (hotswap[ray])")
    sp.add_argument("--replicas", type=_positive_int, help="--ray: engine replicas (default 2)")
    sp.add_argument("--ray-address", help="--ray: 'auto' or ray://HOST:10001 to join a cluster (default: start one)")
    sp.add_argument("--replica-cpus", type=float, help="--ray: Ray CPUs reserved per replica (default 1)")
    sp.add_argument("--ray-http-port", type=int, help="--ray: Ray Serve's HTTP proxy port (default 8000)")
    sp.add_argument("--adapters-per-replica", type=_positive_int, help="--ray: adapters a replica keeps (64)")

    sp = add("generate", cmd_generate, "send one generation request to a server")
    sp.add_argument("prompt", nargs="?", help="prompt text (or --prompt-ids)")
    sp.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    sp.add_argument("--adapter", action="append", default=[], help="REF or REF=WEIGHT; repeat to compose")
    sp.add_argument("--prompt-ids", help="comma-separated token ids instead of text, e.g. 5,17,99")
    sp.add_argument("--max-new-tokens", type=_positive_int)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sp.add_argument("--stream", action="store_true", help="print tokens as they come")
    sp.add_argument("--json", action="store_true", help="print the full response (token_ids, usage, timings)")
    _client_options(sp)

    sp = add("health", cmd_health, "check a server's gRPC health (exit 0 when SERVING)")
    sp.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    sp.add_argument("--service", default="", help="service name (default: the whole server)")
    _client_options(sp)

    sp = add("alias", cmd_alias, "point an alias at a version (rollback = point it back)")
    sp.add_argument("name")
    sp.add_argument("alias")
    sp.add_argument("version", nargs="?", type=_positive_int)
    sp.add_argument("--delete", action="store_true", help="remove the alias")
    return p


def _quiet_libraries() -> None:
    """Keep CLI output to our own lines: no library progress bars or deprecation chatter."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    # e.g. PEFT on a config written by a newer PEFT ("Unexpected keyword arguments"); -v shows them
    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\b")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers honours it too
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


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


if __name__ == "__main__":
    sys.exit(main())
