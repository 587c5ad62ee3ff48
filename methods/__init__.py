"""hotswap.methods: one folder per adapter method, each registered by one line below.

A folder holds the method's options dataclass, its artifact (the one writer, the one reader that validates
against the base), its training (or the PEFT config it maps to), its serving slot kind where it has its own,
and its batched op beside a row-loop reference. Everything else reads :func:`registered`.
See CONTRIBUTING.md ("Adding a method") for the worked example.
"""

from __future__ import annotations

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
)
from hotswap.methods.spec import MethodSpec, RandomKnobs, register, registered

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

__all__ = ["MethodSpec", "RandomKnobs", "register", "registered"]
