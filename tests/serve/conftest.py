"""Serving fixtures: adapters of every served method for the tiny base (published once per session), and a
base with a real tokenizer, a registry with tenants and a tokens file for the gRPC server tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hotswap.basemodel import fingerprint, load_model
from hotswap.methods.ia3 import random_ia3s
from hotswap.registry import Registry
from hotswap.serve import Engine
from hotswap.serve.api.server import Server
from hotswap.train import (
    RandomLoraConfig,
    random_bitfit,
    random_bottlenecks,
    random_lora,
    random_prefix,
    random_prompt,
    random_proxies,
    random_sparse,
)
from tests.serve.serverutil import ACME, ADMIN, GLOBEX, make_server

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_lora(base: Path, out: Path, config: LoraConfig, seed: int) -> Path:
    """A LoRA made by PEFT itself (config features our synthetic helper does not set), random A and B."""
    model = get_peft_model(load_model(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(tiny_base: Path, small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> artifact directory, for every method the engine serves."""
    d = tmp_path_factory.mktemp("adapters")
    return {
        "lora4": random_lora(tiny_base, d / "lora4", RandomLoraConfig(rank=4, seed=1, init_std=0.2)),
        "lora8qv": random_lora(
            tiny_base,
            d / "lora8qv",
            RandomLoraConfig(rank=8, seed=2, init_std=0.2, target_modules=("q_proj", "v_proj")),
        ),
        "pattern": _peft_lora(
            tiny_base,
            d / "pattern",
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=ALL_TARGETS,
                rank_pattern={"q_proj": 2, "down_proj": 3},
                alpha_pattern={"v_proj": 4},
            ),
            seed=3,
        ),
        "rslora": _peft_lora(
            tiny_base, d / "rslora", LoraConfig(r=6, lora_alpha=12, target_modules=ALL_TARGETS, use_rslora=True), 4
        ),
        "dropout": _peft_lora(
            tiny_base,
            d / "dropout",
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_dropout=0.3),
            5,
        ),
        "dora": random_lora(tiny_base, d / "dora", RandomLoraConfig(rank=4, seed=6, init_std=0.2, use_dora=True)),
        "prefix": random_prefix(tiny_base, d / "prefix", num_virtual_tokens=5, seed=7),
        "prompt": random_prompt(tiny_base, d / "prompt", num_virtual_tokens=3, seed=8),
        "bitfit": random_bitfit(tiny_base, d / "bitfit", seed=9, std=0.2),
        "lora4b": random_lora(tiny_base, d / "lora4b", RandomLoraConfig(rank=4, seed=10, init_std=0.2)),
        "fishmask": random_sparse(tiny_base, d / "fishmask", "fishmask", density=0.05, seed=11, std=0.3),
        "child": random_sparse(tiny_base, d / "child", "child-tuning", density=0.2, seed=12, std=0.1),
        "bottleneck": random_bottlenecks(tiny_base, {d / "bottleneck": 13}, bottleneck_dim=8, std=0.3)[0],
        "bottleneck-par": random_bottlenecks(
            tiny_base, {d / "bottleneck-par": 14}, bottleneck_dim=4, activation="gelu", placement="parallel", std=0.3
        )[0],
        "proxy": random_proxies(small_base, {d / "proxy": 15}, alpha=1.5, std=0.3)[0],
        "proxy2": random_proxies(small_base, {d / "proxy2": 16}, alpha=1.5, std=0.3)[0],
        "ia3": random_ia3s(tiny_base, {d / "ia3": 17})[0],
    }


@pytest.fixture(scope="session")
def registry_path(tiny_base: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-registry")
    reg = Registry(root)
    fp = fingerprint(tiny_base)
    for name, path in adapters.items():
        reg.publish(path, name, base_fingerprint=fp)
    return root


@pytest.fixture(scope="module")
def engine(tiny_base: Path, registry_path: Path) -> Iterator[Engine]:
    with Engine(tiny_base, registry_path, max_batch=20, max_resident=20, max_seq_len=128) as eng:
        yield eng


@pytest.fixture(scope="session")
def server_registry(text_base: Path, other_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("server-adapters")
    root = d / "registry"
    reg = Registry(root)
    fp = fingerprint(text_base)
    cfg = RandomLoraConfig(rank=4, init_std=0.3)
    reg.publish(
        random_lora(text_base, d / "math", RandomLoraConfig(rank=4, seed=1, init_std=0.3)), "math", base_fingerprint=fp
    )
    reg.publish(
        random_lora(text_base, d / "tone", RandomLoraConfig(rank=4, seed=2, init_std=0.3, use_dora=True)),
        "acme/tone",
        base_fingerprint=fp,
    )
    reg.publish(random_bitfit(text_base, d / "shared", seed=3, std=0.3), "acme/shared", base_fingerprint=fp,
                visibility="public")  # fmt: skip
    reg.publish(
        random_prefix(text_base, d / "secret", num_virtual_tokens=4, seed=4), "globex/secret", base_fingerprint=fp
    )
    reg.publish(random_lora(text_base, d / "long", cfg), "long", base_fingerprint=fp)
    reg.publish(random_lora(other_base, d / "elsewhere", cfg), "elsewhere", base_fingerprint=fingerprint(other_base))
    reg.publish(random_lora(text_base, d / "corrupt", cfg), "corrupt", base_fingerprint=fp)
    weights = reg.backend.local_path("corrupt", 1) / "adapter_model.safetensors"  # type: ignore[attr-defined]
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: the sha256 check must catch it
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.toml"
    globex_sha = hashlib.sha256(GLOBEX.encode()).hexdigest()
    path.write_text(
        f'[[token]]\ntoken = "{ACME}"\ntenant = "acme"\n\n'
        f'[[token]]\ntoken_sha256 = "{globex_sha}"\ntenant = "globex"\nrole = "user"\n\n'
        f'[[token]]\ntoken = "{ADMIN}"\nrole = "admin"\n'
    )
    return path


@pytest.fixture(scope="module")
def server(text_base: Path, server_registry: Path, tokens_file: Path) -> Iterator[Server]:
    srv = make_server(text_base, server_registry, tokens_file).start()
    yield srv
    srv.stop(grace=1)
