"""Proxy-tuning's artifact (hotswap format): ``hotswap_config.json`` {"method": "proxy", "alpha", "expert",
"anti_expert"} and the two small models as ``save_pretrained`` checkpoints in the named subdirectories."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hotswap.basemodel import check_supported, fingerprint, load_model
from hotswap.errors import ArtifactRejected, HotswapError, InvalidBaseModel, UnsupportedAdapter
from hotswap.formats import HOTSWAP_CONFIG
from hotswap.fsutil import building_dir
from hotswap.methods.api import BaseInfo, LoadedAdapter, check_finite, read_json
from hotswap.methods.api.common import PathLike, check_new
from hotswap.methods.proxy.kind import ProxyKind, ProxyModels

PROXY_EXPERT, PROXY_ANTI_EXPERT = "expert", "anti_expert"


# -- Proxy-tuning (hotswap format) -------------------------------------------------------------------
def load_proxy(path: Path, ref: str, method: str, base: BaseInfo) -> LoadedAdapter:
    """``hotswap_config.json`` {"method": "proxy", "alpha", "expert", "anti_expert"}: the two small models are
    ``from_pretrained`` checkpoints (safetensors) in the named subdirectories (``write_proxy``)."""
    config = read_json(path, HOTSWAP_CONFIG, ref)
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
        try:
            check_supported(model)
        except InvalidBaseModel as e:
            raise UnsupportedAdapter(f"{ref}: proxy {role}: {e}") from e
        if cfg.vocab_size != base.vocab_size:
            raise ArtifactRejected(
                f"{ref}: proxy {role} has vocabulary size {cfg.vocab_size}, the base {base.vocab_size}; "
                "proxy-tuning needs a shared vocabulary"
            )
        for name, param in model.named_parameters():
            check_finite(ref, f"proxy {role} tensor {name}", param, base.dtype)
        models.append(model)
        anti_key = fingerprint(path / sub)  # computed, not read from the config: sharing must be exact
    proxy = ProxyModels(models[0], models[1], float(alpha), anti_key)
    return LoadedAdapter(ref=ref, method=method, parts={ProxyKind.name: proxy})


def write_proxy(out: Path, expert: PreTrainedModel, anti_expert: PreTrainedModel, alpha: float) -> None:
    """THE proxy-tuning artifact format: ``hotswap_config.json`` {"method": "proxy", "alpha", "expert",
    "anti_expert", ...} and the two small models as ``save_pretrained`` checkpoints (config.json +
    model.safetensors) in ``expert/`` and ``anti_expert/``. Served logits: base + alpha * (expert - anti_expert)."""
    for sub, model in ((PROXY_EXPERT, expert), (PROXY_ANTI_EXPERT, anti_expert)):
        model.save_pretrained(out / sub, safe_serialization=True)
    config = {
        "method": "proxy",
        "alpha": alpha,
        "expert": PROXY_EXPERT,
        "anti_expert": PROXY_ANTI_EXPERT,
        "anti_expert_fingerprint": fingerprint(out / PROXY_ANTI_EXPERT),
        "vocab_size": expert.config.vocab_size,
    }
    (out / HOTSWAP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def random_proxies(small: PathLike, outs: Mapping[PathLike, int], alpha: float = 1.0, std: float = 0.02) -> list[Path]:
    """Proxy adapters whose anti-expert is the ``small`` checkpoint and whose expert is it plus random
    noise of ``std`` on every weight (one expert per seed)."""
    paths = check_new(outs)
    anti_expert = load_model(small)
    for out, seed in paths.items():
        expert = copy.deepcopy(anti_expert)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in expert.parameters():
                p += torch.randn(p.shape, generator=gen) * std
        with building_dir(out) as tmp:
            write_proxy(tmp, expert, anti_expert, alpha)
    return list(paths)
