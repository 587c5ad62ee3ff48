"""Reading adapters for serving: what a loader returns (:class:`LoadedAdapter`), what it knows of the base
(:class:`BaseInfo`, :func:`decoder_linears`, :func:`decoder_experts`, :func:`target_linears`) and the checks every
loader uses. The dispatch to each method's own loader is :func:`hotswap.methods.load_adapter`.

The loaders are also the artifact's validation against a base: every tensor must map to a module the
engine wraps, with the shape the base and the config say, a floating dtype and finite values (in the
serving dtype), and nothing may be missing or extra. The engine runs them before anything is installed,
and publishing with a known base runs them too (:func:`base_checker`), so what publishes serves.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as parse_safetensors
from torch import nn

from hotswap.basemodel import head_dim
from hotswap.errors import ArtifactRejected
from hotswap.formats import WEIGHTS
from hotswap.methods.api.kinds import LinearDelta, nbytes


@dataclass
class LoadedAdapter:
    """One adapter read for serving: per linear module its :class:`LinearDelta` (slot kinds' payloads), and its
    engine-wide payloads (context and logit kinds) keyed by kind name."""

    ref: str  # exact "name@version"
    method: str
    linear: dict[str, LinearDelta] = field(default_factory=dict)  # module path -> delta
    parts: dict[str, Any] = field(default_factory=dict)  # context / logit kind name -> payload

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.linear.values()) + sum(nbytes(p) for p in self.parts.values())

    @property
    def rank(self) -> int:
        """The largest rank among its linear deltas (0 without ranked payloads)."""
        return max((d.rank for d in self.linear.values()), default=0)


@dataclass(frozen=True)
class BaseInfo:
    """What loaders need to know about the served base."""

    linears: dict[str, nn.Linear]  # wrapped module path -> the frozen base layer
    experts: dict[str, nn.Module]  # wrapped module path -> an MoE layer's experts (transformers' stacked weights)
    embedding: tuple[str, nn.Embedding]  # the input embedding's module path and module
    head: str | None  # the output head's module path (a linear in ``linears``), None without one
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
        ((embed_name, embed),) = input_embedding(model).items()
        return cls(
            linears={name: getattr(layer, "base", layer) for name, layer in served_linears(model).items()},
            experts={name: getattr(layer, "base", layer) for name, layer in decoder_experts(model).items()},
            embedding=(embed_name, getattr(embed, "base", embed)),
            head=next(iter(output_head(model)), None),
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim(cfg),
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            dtype=model.dtype,
        )


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the decoder blocks (module path -> layer): the ones the engine wraps, so the
    only modules an adapter may target. Once wrapped, the wrapper (holding the linear as ``base``) stands where
    the linear was."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # parents come before their children
        inside_block = ".layers." in name.rpartition(".")[0] + "."
        in_wrapper = any(name.startswith(f"{w}.") for w in found)  # the linear a wrapper holds
        if inside_block and not in_wrapper and isinstance(getattr(module, "base", module), nn.Linear):
            found[name] = module
    return found


def _module_named(model: nn.Module, module: nn.Module | None) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if m is module and module is not None}


def output_head(model: nn.Module) -> dict[str, nn.Module]:
    """The output head (``lm_head``), by path, or nothing: wrapped like the blocks' linears, so adapters may target
    it (PEFT's LoRA on ``lm_head``)."""
    return _module_named(model, model.get_output_embeddings())


def input_embedding(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding (``model.embed_tokens``), by path: wrapped for per-row embedding deltas."""
    return _module_named(model, model.get_input_embeddings())


def served_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear the engine wraps: the decoder blocks' (:func:`decoder_linears`) and the output head."""
    return {**decoder_linears(model), **output_head(model)}


def _is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an MoE layer's experts as transformers stores them: per-expert weights stacked in 3-D
    parameters (``gate_up_proj`` or ``up_proj``, and ``down_proj``), its class dispatched through transformers'
    experts interface (``use_experts_implementation``, which records the layout: ``has_gate``, ``is_transposed``)."""
    down = getattr(module, "down_proj", None)
    layout = hasattr(module, "has_gate") and hasattr(module, "is_transposed")
    return layout and isinstance(down, nn.Parameter) and down.dim() == 3


def decoder_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The MoE layers' experts inside the decoder blocks (module path -> experts): the ones the engine wraps for
    expert adapters (e.g. PEFT's LoRA on ``target_parameters``). Once wrapped, the wrapper (holding the experts as
    ``base``) stands where they were."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside_block = ".layers." in name.rpartition(".")[0] + "."
        in_wrapper = any(name.startswith(f"{w}.") for w in found)
        if inside_block and not in_wrapper and _is_experts(getattr(module, "base", module)):
            found[name] = module
    return found


def expert_projections(experts: nn.Module) -> dict[str, tuple[int, int]]:
    """The projections of one MoE layer's experts, in their registration order: parameter name -> (in_features,
    out_features) of one expert (the stacked weight is (experts, out, in), or (experts, in, out) when transposed)."""
    out = {}
    for name, param in experts.named_parameters(recurse=False):
        if param.dim() == 3:
            _, a, b = param.shape
            out[name] = (a, b) if experts.is_transposed else (b, a)
    return out


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A base linear's weight (out, in) as float32, dequantized where the layer is quantized (bitsandbytes, torchao:
    PEFT's own helper, which knows their formats). A bitsandbytes int8 layer is dequantized from a copy: the helper
    leaves the layer's own state unusable for its next forward."""
    from peft.utils.integrations import dequantize_module_weight

    if type(linear.weight).__name__ == "Int8Params":
        linear = copy.deepcopy(linear)
    return dequantize_module_weight(linear).detach().float()


def target_linears(model: nn.Module, target_modules: tuple[str, ...] | list[str]) -> dict[str, nn.Linear]:
    """The decoder-block linears whose last name part is in ``target_modules`` (the base layers, unwrapped): the
    one helper by which training, synthetic artifacts and serving agree on what an adapter may target."""
    found = decoder_linears(model).items()
    return {n: getattr(m, "base", m) for n, m in found if n.rsplit(".", 1)[-1] in target_modules}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The artifact's safetensors file as tensors, unchecked. One read into memory, then parsed: ``load_file``'s
    tensors page-fault on first touch, which made the checks and scaling over them slower than the read itself
    (15-20 ms for a 20 MB adapter on a 2-core CPU)."""
    return parse_safetensors((path / WEIGHTS).read_bytes())


def read_tensors(path: Path, ref: str, base: BaseInfo, int_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The artifact's weights, every one checked: floating point (int64 for keys ending in ``int_keys``),
    and finite once cast to the serving dtype."""
    try:
        tensors = read_weights(path)
    except Exception as e:  # safetensors raises its own error type for truncated or malformed files
        raise ArtifactRejected(f"{ref}: {WEIGHTS} is not a readable safetensors file ({e})") from e
    for key, t in tensors.items():
        if key.endswith(int_keys) and int_keys:
            if t.dtype != torch.int64:
                raise ArtifactRejected(f"{ref}: tensor {key} is {t.dtype}, expected torch.int64")
            continue
        if not t.is_floating_point():
            raise ArtifactRejected(f"{ref}: tensor {key} is {t.dtype}; adapter weights must be floating point")
        check_finite(ref, f"tensor {key}", t, base.dtype)
    return tensors


def check_finite(ref: str, what: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """``t`` must hold only finite values once cast to ``dtype``. One pass, nothing allocated: a NaN fails the
    comparisons (aminmax propagates it) and an infinity, or a value the dtype cannot hold, is out of bounds."""
    if not t.numel():
        return
    lo, hi = (x.item() for x in torch.aminmax(t))
    bound = torch.finfo(dtype).max
    if not -bound <= lo <= hi <= bound:
        raise ArtifactRejected(f"{ref}: {what} holds NaN or infinite values (in {dtype})")


def check_shape(ref: str, key: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != expected:
        raise ArtifactRejected(f"{ref}: tensor {key} has shape {tuple(t.shape)}, this base needs {expected}")


def target_linear(ref: str, module: str, key: str, base: BaseInfo) -> nn.Linear:
    if module not in base.linears:
        raise ArtifactRejected(
            f"{ref}: tensor {key} targets {module!r}, not a linear layer (or MoE experts) of the base's blocks"
        )
    return base.linears[module]


def read_json(path: Path, name: str, ref: str) -> dict:
    try:
        data = json.loads((path / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactRejected(f"{ref}: unreadable {name} ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactRejected(f"{ref}: {name} is not a JSON object")
    return data
