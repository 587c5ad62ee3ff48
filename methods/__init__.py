"""hotswap.methods: one folder per adapter method, each registered by one line below.

A folder holds the method's options dataclass, its artifact (the one writer, the one reader that validates
against the base), its training (or the PEFT config it maps to), its serving kind where it has its own, and its
batched op beside a row-loop reference; it imports only :mod:`hotswap.methods.api` (the contract). Everything
else reads :func:`registered`, and reads adapters through :func:`load_adapter`.
See CONTRIBUTING.md ("Adding a method") for the worked example.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hotswap.basemodel import load_model
from hotswap.errors import ArtifactRejected, HotswapError, UnsupportedAdapter
from hotswap.methods import (
    adalora,
    bitfit,
    bottleneck,
    dylora,
    ia3,
    lora,
    plora,
    prefix,
    prompt,
    proxy,
    sparse,
    vera,
)
from hotswap.methods.api import BaseInfo, LoadedAdapter, MethodSpec, RandomKnobs, peft_method, register, registered

register(lora.LORA)
register(lora.DORA)
register(adalora.ADALORA)
register(dylora.DYLORA)
register(plora.PLORA)
register(bitfit.BITFIT)
register(sparse.FISHMASK)
register(sparse.CHILD_TUNING)
register(bottleneck.BOTTLENECK)
register(prefix.PREFIX)
register(prompt.PROMPT)
register(proxy.PROXY)
register(ia3.IA3)
register(vera.VERA)


def load_adapter(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """Read and validate the artifact at ``path`` (adapter ``ref``, ``method``) for ``base``.

    Raises :class:`ArtifactRejected` (or :class:`UnsupportedAdapter`) naming what does not fit; any other
    failure while reading is reported as ArtifactRejected too: a stored artifact, not the caller, is at fault."""
    spec = registered().get(method)
    if spec is None:
        raise UnsupportedAdapter(f"{ref}: method {method!r} is not served (served: {', '.join(sorted(registered()))})")
    try:
        return spec.load(path, ref, method, base)
    except HotswapError:
        raise
    except Exception as e:  # e.g. a JSON field of the wrong type in a config PEFT parses
        raise ArtifactRejected(f"{ref}: cannot be read as a {method} adapter ({type(e).__name__}: {e})") from e


def base_checker(base_dir: Path, quantize: str | None = None) -> Callable[[Path, str], None]:
    """``check(artifact_dir, method)`` for :meth:`Registry.publish`: runs the serving loader against the base
    at ``base_dir`` (quantized at load by ``quantize``), so an artifact that would not serve on it is refused before
    it is published."""
    info = BaseInfo.of(load_model(base_dir, quantize=quantize))

    def check(path: Path, method: str) -> None:
        load_adapter(path, path.name, method, info)

    return check


__all__ = [
    "MethodSpec",
    "RandomKnobs",
    "base_checker",
    "load_adapter",
    "peft_method",
    "register",
    "registered",
]
