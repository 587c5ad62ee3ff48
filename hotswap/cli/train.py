"""Training commands: base build and fingerprint, adapter random, train."""

from __future__ import annotations

import argparse
from pathlib import Path

from hotswap.cli.common import AddCommand, positive_int
from hotswap.errors import InvalidArgument


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


def register(sub: argparse._SubParsersAction, add: AddCommand) -> None:
    _add_base(sub)
    _add_adapter(sub)
    _add_train(add)


def _add_base(sub: argparse._SubParsersAction) -> None:
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


def _add_adapter(sub: argparse._SubParsersAction) -> None:
    adapter = sub.add_parser("adapter", help="create adapter artifacts without training")
    adapter_sub = adapter.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")
    sp = adapter_sub.add_parser("random", help="a PEFT LoRA/DoRA adapter with random non-zero weights")
    sp.add_argument("--base", required=True, type=Path)
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--rank", type=positive_int, default=8)
    sp.add_argument("--alpha", type=float, default=16.0)
    sp.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    sp.add_argument("--dora", action="store_true")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--init-std", type=float, default=0.02, help="std of the random A and B entries")
    sp.set_defaults(fn=cmd_adapter_random)


def _add_train(add: AddCommand) -> None:
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
    sp.add_argument("--steps", type=positive_int, help="optimizer steps (default 200)")
    sp.add_argument("--epochs", type=float, help="passes over the data, instead of --steps")
    sp.add_argument("--lr", type=float, help="learning rate (default per method)")
    sp.add_argument("--batch-size", type=positive_int, default=16)
    sp.add_argument("--eval-every", type=positive_int, default=50)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default="cpu")
    sp.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward: less memory, slower"
    )
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_method_options(sp)


def _add_method_options(sp: argparse.ArgumentParser) -> None:
    """The methods' options (``TrainConfig.options``); each method reads its own and has its defaults."""
    sp.add_argument("--rank", type=positive_int, help="lora/dora/dylora/plora: rank r (default 8)")
    sp.add_argument("--alpha", type=float, help="lora-family: alpha (default 16); proxy: offset strength (1)")
    sp.add_argument("--dropout", type=float, help="lora/dora: dropout (default 0)")
    sp.add_argument("--targets", help="comma-separated module names (default: all seven linears of a block)")
    sp.add_argument("--virtual-tokens", dest="virtual_tokens", type=positive_int, help="prefix/prompt (default 8)")
    sp.add_argument("--init-rank", type=positive_int, help="adalora: starting rank of every layer (12)")
    sp.add_argument("--target-rank", type=positive_int, help="adalora: average final rank (8)")
    sp.add_argument("--orth-reg-weight", type=float, help="adalora: orthogonality penalty (0.5)")
    sp.add_argument("--bottleneck-dim", type=positive_int, help="bottleneck: hidden size m (default 16)")
    sp.add_argument("--activation", choices=("relu", "gelu", "silu"), help="bottleneck: nonlinearity (relu)")
    sp.add_argument("--placement", choices=("serial", "parallel"), help="bottleneck: after or beside the sublayer")
    sp.add_argument("--density", type=float, help="fishmask/child-tuning: share of weights trained (0.005/0.2)")
    sp.add_argument("--fisher-batches", type=positive_int, help="fishmask/child-tuning: batches for Fisher (8)")
    sp.add_argument("--variant", choices=("d", "f"), help="child-tuning: d = Fisher-selected (default), f = random")
    sp.add_argument("--period", type=positive_int, help="plora: steps between offloads into the backbone (50)")
    sp.add_argument("--momentum", type=float, help="plora: share of A, B kept at each offload (default 0)")
    sp.add_argument("--plora-export", choices=("stacked", "svd"), help="plora: exact stacked factors or SVD")
    sp.add_argument("--svd-rank", type=positive_int, help="plora with --plora-export svd: rank kept (default r)")
    sp.add_argument("--small-model", type=Path, help="proxy: small checkpoint sharing the base's vocabulary")
