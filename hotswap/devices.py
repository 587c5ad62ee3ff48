"""Device and dtype choices shared by serving, training and benchmarks: one rule for ``auto``.

``--device auto`` is CUDA when torch sees one, else the CPU. ``--dtype auto`` is the checkpoint's own
``torch_dtype`` (config.json ``dtype``), except on a CPU: there half precision runs only where the CPU has
native bfloat16 (AVX512-BF16 / AMX) and the checkpoint is bfloat16; anything else runs in float32 (float16
matmuls on a CPU are emulated, and slow).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap.errors import InvalidArgument

if TYPE_CHECKING:  # the choices are plain names, so CLI parsers and configs import this without torch
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# How the engine runs full decode steps: eagerly, or as the static step (serve.model.graphs) run eagerly, traced by
# torch.compile, or captured as CUDA graphs.
DECODE_CHOICES = ("eager", "static", "compile", "cuda-graphs")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPE_NAMES`."""
    import torch

    if name not in DTYPE_NAMES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def resolve_device(spec: str) -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device torch can use now, or a one-line refusal."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InvalidArgument(f"device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {spec!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {spec!r}: torch sees no CUDA device here (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InvalidArgument(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return spec


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype name a checkpoint's config.json records (``dtype``, or the older ``torch_dtype``), if any."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in DTYPE_NAMES else None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(spec: str, checkpoint: str | Path, device: str) -> str:
    """``auto`` or a name in :data:`DTYPE_NAMES` -> the dtype name to load ``checkpoint`` in on ``device``."""
    if spec != "auto":
        if spec not in DTYPE_NAMES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {spec!r}")
        return spec
    stored = checkpoint_dtype(checkpoint) or "float32"
    if device.split(":")[0] == "cpu" and not (stored == "bfloat16" and cpu_has_bf16()):
        return "float32"
    return stored


def free_memory(device: str) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the host's available RAM."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
