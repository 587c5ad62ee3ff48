"""The engine's configuration, a dataclass validated in ``__post_init__`` (pure Python). Each field's ``metadata``
makes it a setting of ``hotswap serve`` and of Ray Serve's ``build_app`` (:mod:`hotswap.settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hotswap.devices import DECODE_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES
from hotswap.errors import InvalidArgument
from hotswap.quantization import QUANTIZE_CHOICES, check_quantize


@dataclass(frozen=True)
class EngineConfig:
    """The engine: batching, adapter slots and caches, device."""

    max_batch: int = field(default=32, metadata={"help": "rows decoded together"})
    max_resident: int = field(default=16, metadata={"help": "adapters resident in slots, ready for the batched ops"})
    max_seq_len: int = field(
        default=1024, metadata={"help": "tokens per row: prefix + virtual tokens + prompt + generated"}
    )
    max_queue: int = field(default=256, metadata={"help": "waiting requests; more are refused (RESOURCE_EXHAUSTED)"})
    max_adapters_per_request: int = field(default=8, metadata={"help": "length of a weighted adapter list"})
    max_rank: int = field(
        default=64,
        metadata={"help": "largest adapter rank served; slot tables hold max_resident x (largest rank loaded)"},
    )
    host_cache_bytes: int = field(
        default=2 << 30, metadata={"help": "bytes of loaded adapters kept in host RAM beyond the resident ones"}
    )
    device: str = field(
        default="auto", metadata={"help": f"{' | '.join(DEVICE_CHOICES)} (or cuda:N); auto = cuda if present"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights, activations and KV cache; auto = the checkpoint's dtype (float32 on a CPU without bf16)",
            "choices": DTYPE_CHOICES,
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "quantize a float base at load with bitsandbytes (nf4 and fp4: 4 bits; int8) or torchao (int8 "
            "weights); an adapter serves only on the base it was published for, quantization included",
            "choices": QUANTIZE_CHOICES,
        },
    )
    kv_block_size: int = field(
        default=16, metadata={"help": "KV cache block size in positions; 0 = a static max_batch x max_seq_len cache"}
    )
    kv_cache_memory: float = field(
        default=0.0,
        metadata={
            "help": "KV cache size: bytes (> 1) or a fraction of free device memory (<= 1); "
            "0 = what max_batch rows of max_seq_len need"
        },
    )
    prefix_cache: bool = field(
        default=True, metadata={"help": "reuse cached KV blocks of prompt prefixes, per exact adapter set"}
    )
    max_prefill_tokens: int = field(
        default=2048, metadata={"help": "prompt positions prefilled per step over all rows (chunked); 0 = no limit"}
    )
    decode: str = field(
        default="eager",
        metadata={
            "help": "full decode steps: eager; static (fixed shapes per batch bucket, run eagerly); compile "
            "(that step traced by torch.compile); CUDA graphs (captured, one graph per bucket and adapter layout)",
            "choices": DECODE_CHOICES,
        },
    )
    # CPU intra-op threads for prefill (compute-bound: all cores) and decode (memory-bound: on small
    # batches extra threads add fork/join cost to every small op and barely speed up the big ones).
    prefill_threads: int = field(default=0, metadata={"help": "CPU threads for prefill; 0 = torch's default (all)"})
    decode_threads: int = field(default=1, metadata={"help": "CPU threads for decode steps"})

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_resident", "max_seq_len", "max_queue", "max_adapters_per_request", "max_rank"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("host_cache_bytes", "prefill_threads", "decode_threads", "kv_block_size", "kv_cache_memory",
                     "max_prefill_tokens"):  # fmt: skip  # 0: none / torch's default / static / as needed / no limit
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        check_quantize(self.quantize)
        if self.decode not in DECODE_CHOICES:
            raise InvalidArgument(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {self.decode!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
