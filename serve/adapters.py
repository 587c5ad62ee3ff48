"""Adapter kinds the engine serves: each method registers one loader that turns a verified artifact
directory into a :class:`LoadedAdapter` (host tensors, ready to install in a resident slot).

The loaders are also the artifact's validation against a base: every tensor must map to a module the
engine wraps, with the shape the base and the config say, a floating dtype and finite values (in the
serving dtype), and nothing may be missing or extra. The engine runs them before anything is installed,
and publishing with a known base runs them too (:func:`base_checker`), so what publishes serves.

PEFT's classes read the configs (``LoraConfig``, ``PrefixTuningConfig``...) and its pattern helper
resolves ``rank_pattern``/``alpha_pattern``, so our numbers are PEFT's; the forward math is ours
because PEFT applies one adapter per model call (or a Python loop over ``adapter_names`` groups).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import ArtifactRejected, HotswapError, UnsupportedAdapter
from hotswap.registry import HOTSWAP_CONFIG, PEFT_CONFIG
from hotswap.serve.layers import LinearDelta, MultiAdapterLinear
from hotswap.serve.ops.bottleneck import ACTIVATIONS, Bottleneck
from hotswap.serve.proxy import ProxyModels
from hotswap.serve.runner import SUPPORTED_MODEL_TYPES, head_dim

_PEFT_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoadedAdapter:
    ref: str  # exact "name@version"
    method: str
    linear: dict[str, LinearDelta] = field(default_factory=dict)  # module path -> delta
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (kv_heads, P, head_dim) x2
    prompt_embeds: torch.Tensor | None = None  # (T, hidden) virtual tokens prepended to the prompt
    proxy: ProxyModels | None = None  # proxy-tuning's expert and anti-expert

    @property
    def nbytes(self) -> int:
        n = sum(d.nbytes for d in self.linear.values()) + (self.proxy.nbytes if self.proxy else 0)
        for t in [*((self.prefix_kv and [t for kv in self.prefix_kv for t in kv]) or []), self.prompt_embeds]:
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv[0][0].shape[1]

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.prompt_embeds is None else self.prompt_embeds.shape[0]


@dataclass(frozen=True)
class BaseInfo:
    """What loaders need to know about the served base."""

    linears: dict[str, nn.Linear]  # wrapped module path -> the frozen base layer
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> BaseInfo:
        """The facts of a loaded base (before or after the engine wraps its linears)."""
        cfg = model.config
        return cls(
            linears={name: getattr(layer, "base", layer) for name, layer in decoder_linears(model).items()},
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim(cfg),
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            dtype=model.dtype,
        )


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the decoder blocks (module path -> layer): the ones the engine wraps, so the
    only modules an adapter may target. Once wrapped, the wrapper stands where the linear was."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # parents come before their children
        inside_block = ".layers." in name.rpartition(".")[0] + "."
        in_wrapper = any(name.startswith(f"{w}.") for w in found)  # the linear a wrapper holds
        if inside_block and not in_wrapper and isinstance(module, nn.Linear | MultiAdapterLinear):
            found[name] = module
    return found


Loader = Callable[[Path, str, str, BaseInfo], LoadedAdapter]
_LOADERS: dict[str, Loader] = {}


def register_method(name: str, loader: Loader) -> None:
    """Register the loader for one method name; a name registers once."""
    if name in _LOADERS:
        raise ValueError(f"method {name!r} is already registered")
    _LOADERS[name] = loader


def served_methods() -> list[str]:
    return sorted(_LOADERS)


def load_adapter(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """Read and validate the artifact at ``path`` (adapter ``ref``, ``method``) for ``base``.

    Raises :class:`ArtifactRejected` (or :class:`UnsupportedAdapter`) naming what does not fit; any other
    failure while reading is reported as ArtifactRejected too: a stored artifact, not the caller, is at fault."""
    loader = _LOADERS.get(method)
    if loader is None:
        raise UnsupportedAdapter(f"{ref}: method {method!r} is not served (served: {', '.join(served_methods())})")
    try:
        return loader(path, ref, method, base)
    except HotswapError:
        raise
    except Exception as e:  # e.g. a JSON field of the wrong type in a config PEFT parses
        raise ArtifactRejected(f"{ref}: cannot be read as a {method} adapter ({type(e).__name__}: {e})") from e


def base_checker(base_dir: Path) -> Callable[[Path, str], None]:
    """``check(artifact_dir, method)`` for :meth:`Registry.publish`: runs the serving loader against the base
    at ``base_dir``, so an artifact that would not serve on it is refused before it is published."""
    info = BaseInfo.of(load_model(base_dir))

    def check(path: Path, method: str) -> None:
        load_adapter(path, path.name, method, info)

    return check


def _tensors(path: Path, ref: str, base: BaseInfo, int_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The artifact's weights, every one checked: floating point (int64 for keys ending in ``int_keys``),
    and finite once cast to the serving dtype."""
    try:
        tensors = load_file(path / _WEIGHTS)
    except Exception as e:  # safetensors raises its own error type for truncated or malformed files
        raise ArtifactRejected(f"{ref}: {_WEIGHTS} is not a readable safetensors file ({e})") from e
    top = torch.finfo(base.dtype).max
    for key, t in tensors.items():
        if key.endswith(int_keys) and int_keys:
            if t.dtype != torch.int64:
                raise ArtifactRejected(f"{ref}: tensor {key} is {t.dtype}, expected torch.int64")
            continue
        if not t.is_floating_point():
            raise ArtifactRejected(f"{ref}: tensor {key} is {t.dtype}; adapter weights must be floating point")
        if t.numel() and not (torch.isfinite(t).all() and t.abs().max() <= top):
            raise ArtifactRejected(f"{ref}: tensor {key} holds NaN or infinite values (in {base.dtype})")
    return tensors


def _shape(ref: str, key: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ArtifactRejected(f"{ref}: tensor {key} has shape {tuple(t.shape)}, this base needs {expected}")


def _target(ref: str, module: str, key: str, base: BaseInfo) -> nn.Linear:
    if module not in base.linears:
        raise ArtifactRejected(f"{ref}: tensor {key} targets {module!r}, not a linear layer of the base's blocks")
    return base.linears[module]


def _json(path: Path, name: str, ref: str) -> dict:
    try:
        data = json.loads((path / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactRejected(f"{ref}: unreadable {name} ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactRejected(f"{ref}: {name} is not a JSON object")
    return data


# -- LoRA family (LoRA, DoRA, and anything published in PEFT's LoRA format) --------------------------
_LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def load_lora(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    peft_type = _json(path, PEFT_CONFIG, ref).get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{ref}: PEFT type {peft_type} is not served on the LoRA path; publish LoRA-format files "
            "(hotswap train exports AdaLoRA that way)"
        )
    config = LoraConfig.from_pretrained(str(path))
    if config.bias != "none" or getattr(config, "lora_bias", False):
        raise UnsupportedAdapter(f"{ref}: LoRA bias={config.bias!r} is not served; use bias='none'")
    tensors = {k.removeprefix(_PEFT_PREFIX): v for k, v in _tensors(path, ref, base).items()}
    modules: set[str] = set()
    for key in tensors:
        module, _, part = key.partition(".lora_")
        if not part or f"lora_{part}" not in _LORA_PARTS:
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} (a LoRA artifact holds {', '.join(_LORA_PARTS)})")
        _target(ref, module, key, base)
        modules.add(module)
    out = LoadedAdapter(ref=ref, method=method)
    for module in sorted(modules):
        linear = base.linears[module]
        try:
            a = tensors[f"{module}.lora_A.weight"].float()  # (r, in)
            b = tensors[f"{module}.lora_B.weight"].float()  # (out, r)
        except KeyError as e:
            raise ArtifactRejected(f"{ref}: {module} lacks tensor {e.args[0]!r}") from None
        # PEFT matches rank/alpha patterns against the module's full name in the base model.
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ArtifactRejected(f"{ref}: {module}'s rank in {PEFT_CONFIG} must be a positive integer, got {r!r}")
        _shape(ref, f"{module}.lora_A.weight", a, (r, linear.in_features))
        _shape(ref, f"{module}.lora_B.weight", b, (linear.out_features, r))
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        b_scaled = (b * scaling).T.contiguous()  # (r, out)
        dora_scale = None
        magnitude = tensors.get(f"{module}.lora_magnitude_vector")
        if magnitude is not None:
            _shape(ref, f"{module}.lora_magnitude_vector", magnitude, (linear.out_features,))
            # DoRA (PEFT's DoraLinearLayer): y = W x + (m/n - 1) * W x + (m/n) * s B A x, n = ||W + s B A||
            # per output row, computed once here in fp32; m/n is folded into B.
            weight = linear.weight.float() + scaling * (b @ a)  # (out, in)
            mag_scale = magnitude.float() / torch.linalg.norm(weight, dim=1)  # (out,)
            if not torch.isfinite(mag_scale).all():
                raise ArtifactRejected(f"{ref}: {module}'s DoRA scale is not finite (a zero-norm weight row)")
            b_scaled = b_scaled * mag_scale[None, :]
            dora_scale = (mag_scale - 1).to(base.dtype)
        out.linear[module] = LinearDelta(A=a.to(base.dtype), B=b_scaled.to(base.dtype), dora_scale=dora_scale)
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no LoRA tensors found in {_WEIGHTS}")
    return out


# -- BitFit (hotswap format) ------------------------------------------------------------------------
def load_bitfit(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "bitfit"} + ``adapter_model.safetensors`` with ``<module>.bias``
    tensors holding each bias *delta* (added to the base bias; a layer without bias gets it only in the
    adapter's rows)."""
    out = LoadedAdapter(ref=ref, method=method)
    for key, t in _tensors(path, ref, base).items():
        if not key.endswith(".bias"):
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} (a BitFit artifact holds <module>.bias)")
        linear = _target(ref, key.removesuffix(".bias"), key, base)
        _shape(ref, key, t, (linear.out_features,))
        out.linear[key.removesuffix(".bias")] = LinearDelta(bias=t.to(base.dtype))
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no bias tensors in {_WEIGHTS}")
    return out


# -- Sparse deltas (hotswap format: Child-tuning, FishMask) ------------------------------------------
def load_sparse(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "fishmask" | "child-tuning"} + ``adapter_model.safetensors`` with
    ``<module>.weight.indices`` (int64, flat row-major into (out, in)) and ``<module>.weight.values``."""
    tensors = _tensors(path, ref, base, int_keys=(".weight.indices",))
    out = LoadedAdapter(ref=ref, method=method)
    for key in tensors:
        if not key.endswith((".weight.indices", ".weight.values")):
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} in a sparse artifact")
    for key in sorted(tensors):
        if not key.endswith(".weight.indices"):
            continue
        module = key.removesuffix(".weight.indices")
        linear = _target(ref, module, key, base)
        idx, val = tensors[key], tensors.get(f"{module}.weight.values")
        if val is None or idx.ndim != 1 or idx.shape != val.shape:
            raise ArtifactRejected(f"{ref}: {module} needs 1-d indices and values of the same length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= linear.out_features * linear.in_features):
            raise ArtifactRejected(f"{ref}: {key} has indices outside its weight")
        out.linear[module] = LinearDelta(sparse=(idx, val.to(base.dtype)))
    for key in tensors:
        if key.endswith(".values") and key.removesuffix("values") + "indices" not in tensors:
            raise ArtifactRejected(f"{ref}: tensor {key} has no indices")
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no sparse deltas in {_WEIGHTS}")
    return out


# -- Bottleneck adapters (hotswap format) -------------------------------------------------------------
_BOTTLENECK_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def load_bottleneck(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "bottleneck", "activation", "placement"} + per adapted linear
    ``<module>.adapter_down.{weight,bias}`` and ``<module>.adapter_up.{weight,bias}``."""
    config = _json(path, HOTSWAP_CONFIG, ref)
    activation, placement = config.get("activation", "relu"), config.get("placement", "serial")
    if activation not in ACTIVATIONS or placement not in ("serial", "parallel"):
        raise UnsupportedAdapter(f"{ref}: activation {activation!r} / placement {placement!r} not served")
    tensors = _tensors(path, ref, base)
    modules = set()
    for key in tensors:
        module, _, part = key.partition(".adapter_")
        if part not in _BOTTLENECK_PARTS:
            raise ArtifactRejected(f"{ref}: unexpected tensor {key!r} in a bottleneck artifact")
        _target(ref, module, key, base)
        modules.add(module)
    out = LoadedAdapter(ref=ref, method=method)
    for module in sorted(modules):
        try:
            down, down_b, up, up_b = (tensors[f"{module}.adapter_{p}"] for p in _BOTTLENECK_PARTS)
        except KeyError as e:
            raise ArtifactRejected(f"{ref}: {module} lacks tensor {e.args[0]!r}") from None
        linear = base.linears[module]
        d = linear.out_features if placement == "serial" else linear.in_features
        m = down.shape[0]
        _shape(ref, f"{module}.adapter_down.weight", down, (m, d))
        _shape(ref, f"{module}.adapter_down.bias", down_b, (m,))
        _shape(ref, f"{module}.adapter_up.weight", up, (linear.out_features, m))
        _shape(ref, f"{module}.adapter_up.bias", up_b, (linear.out_features,))
        bn = Bottleneck(down, down_b, up, up_b, activation=activation, serial=placement == "serial")
        out.linear[module] = LinearDelta(bottleneck=bn)
    if not out.linear:
        raise ArtifactRejected(f"{ref}: no bottleneck modules in {_WEIGHTS}")
    return out


# -- Prefix and prompt tuning (PEFT format) -----------------------------------------------------------
def _virtual(path: Path, ref: str, base: BaseInfo) -> tuple[dict, torch.Tensor]:
    """The PEFT config and the ``prompt_embeddings`` tensor, alone in the weights file."""
    config = _json(path, PEFT_CONFIG, ref)
    tensors = _tensors(path, ref, base)
    if extra := sorted(set(tensors) - {"prompt_embeddings"}):
        raise ArtifactRejected(f"{ref}: unexpected tensor {extra[0]!r} (expected only prompt_embeddings)")
    if "prompt_embeddings" not in tensors:
        raise ArtifactRejected(f"{ref}: {_WEIGHTS} lacks tensor 'prompt_embeddings'")
    p = config.get("num_virtual_tokens")
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ArtifactRejected(f"{ref}: num_virtual_tokens must be a positive integer, got {p!r}")
    return config, tensors["prompt_embeddings"]


def load_prefix(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    config, emb = _virtual(path, ref, base)  # (P, layers * 2 * kv_heads * head_dim), final KV
    layers = config.get("num_layers", base.num_layers)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers != base.num_layers:
        raise ArtifactRejected(f"{ref}: {PEFT_CONFIG} num_layers is {layers!r}; this base has {base.num_layers} layers")
    p = config["num_virtual_tokens"]
    _shape(ref, "prompt_embeddings", emb, (p, base.num_layers * 2 * base.num_kv_heads * base.head_dim))
    # PEFT's get_prompt: view(P, L*2, kv, hd).permute -> (L*2, kv, P, hd); layer l uses [2l] as K, [2l+1] as V.
    kv = emb.view(p, base.num_layers * 2, base.num_kv_heads, base.head_dim).permute(1, 2, 0, 3).to(base.dtype)
    pairs = [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(base.num_layers)]
    return LoadedAdapter(ref=ref, method=method, prefix_kv=pairs)


def load_prompt(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    config, emb = _virtual(path, ref, base)  # (T, hidden)
    _shape(ref, "prompt_embeddings", emb, (config["num_virtual_tokens"], base.hidden_size))
    return LoadedAdapter(ref=ref, method=method, prompt_embeds=emb.to(base.dtype))


# -- Proxy-tuning (hotswap format) -------------------------------------------------------------------
def load_proxy(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "proxy", "alpha", "expert", "anti_expert"}: the two small models are
    ``from_pretrained`` checkpoints (safetensors) in the named subdirectories (``write_proxy``)."""
    config = _json(path, HOTSWAP_CONFIG, ref)
    alpha = config.get("alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ArtifactRejected(f"{ref}: proxy alpha must be a finite number, got {alpha!r}")
    models, anti_key = [], ""
    for role in ("expert", "anti_expert"):
        sub = config.get(role)
        if not isinstance(sub, str) or not (path / sub).is_dir() or Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise ArtifactRejected(f"{ref}: proxy {role} must name a subdirectory of the artifact, got {sub!r}")
        try:
            model = load_model(path / sub, dtype=base.dtype)
        except HotswapError as e:
            raise ArtifactRejected(f"{ref}: proxy {role}: {e}") from e
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedAdapter(f"{ref}: proxy {role} is a {cfg.model_type!r} model; served: llama")
        if cfg.vocab_size != base.vocab_size:
            raise ArtifactRejected(
                f"{ref}: proxy {role} has vocabulary size {cfg.vocab_size}, the base {base.vocab_size}; "
                "proxy-tuning needs a shared vocabulary"
            )
        for name, param in model.named_parameters():
            if not torch.isfinite(param).all():
                raise ArtifactRejected(f"{ref}: proxy {role} tensor {name} holds NaN or infinite values")
        models.append(model)
        anti_key = fingerprint(path / sub)  # computed, not read from the config: sharing must be exact
    proxy = ProxyModels(models[0], models[1], float(alpha), anti_key)
    return LoadedAdapter(ref=ref, method=method, proxy=proxy)


register_method("lora", load_lora)
register_method("dora", load_lora)
register_method("plora", load_lora)  # PEFT LoRA files carrying PLoRA's accumulated delta
register_method("adalora", load_lora)  # hotswap train exports AdaLoRA as LoRA at its final ranks
register_method("dylora", load_lora)  # LoRA files at the max rank; a request may ask for a lower one
register_method("bitfit", load_bitfit)
register_method("fishmask", load_sparse)
register_method("child-tuning", load_sparse)
register_method("bottleneck", load_bottleneck)
register_method("prefix", load_prefix)
register_method("prompt", load_prompt)
register_method("proxy", load_proxy)
