"""Adapter kinds the engine serves: each method registers one loader that turns a verified artifact
directory into a :class:`LoadedAdapter` (host tensors, ready to install in a resident slot).

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
from peft import LoraConfig, PromptTuningConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from hotswap.basemodel import fingerprint, load_model
from hotswap.errors import HotswapError, InvalidArtifact, UnsupportedAdapter
from hotswap.registry import HOTSWAP_CONFIG, PEFT_CONFIG, Manifest
from hotswap.serve.layers import LinearDelta
from hotswap.serve.ops.bottleneck import ACTIVATIONS, Bottleneck
from hotswap.serve.proxy import ProxyModels
from hotswap.serve.runner import SUPPORTED_MODEL_TYPES

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


Loader = Callable[[Path, Manifest, BaseInfo], LoadedAdapter]
_LOADERS: dict[str, Loader] = {}


def register_method(name: str, loader: Loader) -> None:
    """Register the loader for one method name; a name registers once."""
    if name in _LOADERS:
        raise ValueError(f"method {name!r} is already registered")
    _LOADERS[name] = loader


def served_methods() -> list[str]:
    return sorted(_LOADERS)


def load_adapter(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    loader = _LOADERS.get(manifest.method)
    if loader is None:
        raise UnsupportedAdapter(
            f"{manifest.ref}: method {manifest.method!r} is not served (served: {', '.join(served_methods())})"
        )
    return loader(path, manifest, base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(path / _WEIGHTS).items()}


def _peft_json(path: Path) -> dict:
    return json.loads((path / PEFT_CONFIG).read_text())


# -- LoRA family (LoRA, DoRA, and anything published in PEFT's LoRA format) --------------------------
def _load_peft_type(path: Path) -> str:
    try:
        return str(json.loads((path / "adapter_config.json").read_text()).get("peft_type"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArtifact(f"{path}: unreadable adapter_config.json ({e})") from e


def load_lora(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    peft_type = _load_peft_type(path)
    if peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{manifest.ref}: PEFT type {peft_type} is not served on the LoRA path; publish LoRA-format files "
            "(hotswap train exports AdaLoRA that way)"
        )
    config = LoraConfig.from_pretrained(str(path))
    if config.bias != "none" or getattr(config, "lora_bias", False):
        raise UnsupportedAdapter(f"{manifest.ref}: LoRA bias={config.bias!r} is not served; use bias='none'")
    tensors = _weights(path)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    extra = sorted(k for k in tensors if ".lora_" not in k)
    if extra:
        raise UnsupportedAdapter(f"{manifest.ref}: unexpected tensor {extra[0]!r} (modules_to_save is not served)")
    out = LoadedAdapter(ref=manifest.ref, method=manifest.method)
    for module in modules:
        if module not in base.linears:
            raise UnsupportedAdapter(f"{manifest.ref}: targets {module!r}, not a linear layer of the base's blocks")
        a = tensors[f"{module}.lora_A.weight"].float()  # (r, in)
        b = tensors[f"{module}.lora_B.weight"].float()  # (out, r)
        r = a.shape[0]
        # PEFT matches rank/alpha patterns against the module's full name in the base model.
        expected_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        if expected_r != r:
            raise InvalidArtifact(f"{manifest.ref}: {module} has rank {r}, config says {expected_r}")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        linear = base.linears[module]
        b_scaled = (b * scaling).T.contiguous()  # (r, out)
        dora_scale = None
        magnitude = tensors.get(f"{module}.lora_magnitude_vector")
        if magnitude is not None:
            # DoRA (PEFT's DoraLinearLayer): y = W x + (m/n - 1) * W x + (m/n) * s B A x, n = ||W + s B A||
            # per output row, computed once here in fp32; m/n is folded into B.
            weight = linear.weight.float() + scaling * (b @ a)  # (out, in)
            mag_scale = magnitude.float() / torch.linalg.norm(weight, dim=1)  # (out,)
            b_scaled = b_scaled * mag_scale[None, :]
            dora_scale = (mag_scale - 1).to(base.dtype)
        out.linear[module] = LinearDelta(A=a.to(base.dtype), B=b_scaled.to(base.dtype), dora_scale=dora_scale)
    if not out.linear:
        raise InvalidArtifact(f"{manifest.ref}: no LoRA tensors found in {_WEIGHTS}")
    return out


# -- BitFit (hotswap format) ------------------------------------------------------------------------
def load_bitfit(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "bitfit"} + ``adapter_model.safetensors`` with ``<module>.bias``
    tensors holding each bias *delta* (added to the base bias; a layer without bias gets it only in the
    adapter's rows)."""
    out = LoadedAdapter(ref=manifest.ref, method=manifest.method)
    for key, t in load_file(path / _WEIGHTS).items():
        module = key.removesuffix(".bias")
        if not key.endswith(".bias") or module not in base.linears:
            raise UnsupportedAdapter(f"{manifest.ref}: {key!r} is not the bias of a linear layer of the base")
        if t.shape != (base.linears[module].out_features,):
            raise InvalidArtifact(f"{manifest.ref}: {key} has shape {tuple(t.shape)}")
        out.linear[module] = LinearDelta(bias=t.to(base.dtype))
    if not out.linear:
        raise InvalidArtifact(f"{manifest.ref}: no bias tensors in {_WEIGHTS}")
    return out


# -- Sparse deltas (hotswap format: Child-tuning, FishMask) ------------------------------------------
def load_sparse(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "fishmask" | "child-tuning"} + ``adapter_model.safetensors`` with
    ``<module>.weight.indices`` (int64, flat row-major into (out, in)) and ``<module>.weight.values``."""
    tensors = load_file(path / _WEIGHTS)
    out = LoadedAdapter(ref=manifest.ref, method=manifest.method)
    for key in tensors:
        if not key.endswith(".weight.indices"):
            if not key.endswith(".weight.values"):
                raise UnsupportedAdapter(f"{manifest.ref}: unexpected tensor {key!r} in a sparse artifact")
            continue
        module = key.removesuffix(".weight.indices")
        if module not in base.linears:
            raise UnsupportedAdapter(f"{manifest.ref}: {module!r} is not a linear layer of the base's blocks")
        idx, val = tensors[key], tensors.get(f"{module}.weight.values")
        linear = base.linears[module]
        if val is None or idx.dtype != torch.int64 or idx.ndim != 1 or idx.shape != val.shape:
            raise InvalidArtifact(f"{manifest.ref}: {module} needs int64 indices and values of the same length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= linear.out_features * linear.in_features):
            raise InvalidArtifact(f"{manifest.ref}: {module} has indices outside its weight")
        out.linear[module] = LinearDelta(sparse=(idx, val.to(base.dtype)))
    if not out.linear:
        raise InvalidArtifact(f"{manifest.ref}: no sparse deltas in {_WEIGHTS}")
    return out


# -- Bottleneck adapters (hotswap format) -------------------------------------------------------------
def load_bottleneck(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "bottleneck", "activation", "placement"} + per adapted linear
    ``<module>.adapter_down.{weight,bias}`` and ``<module>.adapter_up.{weight,bias}``."""
    config = json.loads((path / HOTSWAP_CONFIG).read_text())
    activation, placement = config.get("activation", "relu"), config.get("placement", "serial")
    if activation not in ACTIVATIONS or placement not in ("serial", "parallel"):
        raise UnsupportedAdapter(f"{manifest.ref}: activation {activation!r} / placement {placement!r} not served")
    tensors = load_file(path / _WEIGHTS)
    out = LoadedAdapter(ref=manifest.ref, method=manifest.method)
    for module in sorted({k.rsplit(".adapter_", 1)[0] for k in tensors}):
        if module not in base.linears:
            raise UnsupportedAdapter(f"{manifest.ref}: {module!r} is not a linear layer of the base's blocks")
        try:
            down, down_b, up, up_b = (
                tensors[f"{module}.adapter_{p}"] for p in ("down.weight", "down.bias", "up.weight", "up.bias")
            )
        except KeyError as e:
            raise InvalidArtifact(f"{manifest.ref}: {module} lacks {e.args[0]}") from None
        linear = base.linears[module]
        d = linear.out_features if placement == "serial" else linear.in_features
        m = down.shape[0]
        if (
            down.shape != (m, d)
            or down_b.shape != (m,)
            or up.shape != (linear.out_features, m)
            or up_b.shape != (linear.out_features,)
        ):
            raise InvalidArtifact(f"{manifest.ref}: {module} bottleneck shapes do not fit the layer")
        bn = Bottleneck(down, down_b, up, up_b, activation=activation, serial=placement == "serial")
        out.linear[module] = LinearDelta(bottleneck=bn)
    if not out.linear:
        raise InvalidArtifact(f"{manifest.ref}: no bottleneck modules in {_WEIGHTS}")
    return out


# -- Prefix tuning (PEFT format) --------------------------------------------------------------------
def load_prefix(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    config = _peft_json(path)
    emb = load_file(path / _WEIGHTS)["prompt_embeddings"]  # (P, layers * 2 * kv_heads * head_dim), final KV
    p = config["num_virtual_tokens"]
    if emb.shape != (p, base.num_layers * 2 * base.num_kv_heads * base.head_dim):
        raise UnsupportedAdapter(f"{manifest.ref}: prefix of shape {tuple(emb.shape)} does not fit this base")
    # PEFT's get_prompt: view(P, L*2, kv, hd).permute -> (L*2, kv, P, hd); layer l uses [2l] as K, [2l+1] as V.
    kv = emb.view(p, base.num_layers * 2, base.num_kv_heads, base.head_dim).permute(1, 2, 0, 3).to(base.dtype)
    pairs = [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(base.num_layers)]
    return LoadedAdapter(ref=manifest.ref, method=manifest.method, prefix_kv=pairs)


# -- Prompt tuning (PEFT format) --------------------------------------------------------------------
def load_prompt(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    config = PromptTuningConfig.from_pretrained(str(path))
    emb = load_file(path / _WEIGHTS)["prompt_embeddings"]  # (T, hidden)
    if emb.shape != (config.num_virtual_tokens, base.hidden_size):
        raise UnsupportedAdapter(f"{manifest.ref}: prompt embeddings {tuple(emb.shape)} do not fit this base")
    return LoadedAdapter(ref=manifest.ref, method=manifest.method, prompt_embeds=emb.to(base.dtype))


# -- Proxy-tuning (hotswap format) -------------------------------------------------------------------
def load_proxy(path: Path, manifest: Manifest, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "proxy", "alpha", "expert", "anti_expert"}: the two small models are
    ``from_pretrained`` checkpoints (safetensors) in the named subdirectories (``write_proxy``)."""
    config = json.loads((path / HOTSWAP_CONFIG).read_text())
    alpha = config.get("alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidArtifact(f"{manifest.ref}: proxy alpha must be a finite number, got {alpha!r}")
    models, anti_key = [], ""
    for role in ("expert", "anti_expert"):
        sub = config.get(role)
        if not isinstance(sub, str) or not (path / sub).is_dir() or Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise InvalidArtifact(f"{manifest.ref}: proxy {role} must name a subdirectory of the artifact, got {sub!r}")
        try:
            model = load_model(path / sub, dtype=base.dtype)
        except HotswapError as e:
            raise InvalidArtifact(f"{manifest.ref}: proxy {role}: {e}") from e
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedAdapter(f"{manifest.ref}: proxy {role} is a {cfg.model_type!r} model; served: llama")
        if cfg.vocab_size != base.vocab_size:
            raise UnsupportedAdapter(
                f"{manifest.ref}: proxy {role} has vocabulary size {cfg.vocab_size}, the base {base.vocab_size}; "
                "proxy-tuning needs a shared vocabulary"
            )
        models.append(model)
        anti_key = fingerprint(path / sub)  # computed, not read from the config: sharing must be exact
    proxy = ProxyModels(models[0], models[1], float(alpha), anti_key)
    return LoadedAdapter(ref=manifest.ref, method=manifest.method, proxy=proxy)


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
