"""A corpus of broken adapter artifacts: each is refused at publish when the base is given (nothing is written),
and, planted in a registry anyway, is refused at load by a running server with FAILED_PRECONDITION (naming the
tensor or field), while other requests in flight produce exactly their solo tokens.

Every broken artifact starts as a good one made by ``hotswap.train``'s helpers (the good ones publish and
serve: the control) and is then edited: its safetensors rewritten, its JSON config changed, or its file cut.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from hotswap.basemodel import build_model, fingerprint
from hotswap.cli import main
from hotswap.client import Client, Stream, build_request
from hotswap.errors import (
    AdapterNotFound,
    ArtifactRejected,
    HotswapError,
    InvalidArtifact,
    UnsupportedAdapter,
    mapping_for,
)
from hotswap.fsutil import sha256_file
from hotswap.methods import base_checker
from hotswap.methods.proxy.artifact import write_proxy
from hotswap.registry import Registry
from hotswap.registry.manifest import MANIFEST_FILE
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
from tests.conftest import SMALL
from tests.serve.serverutil import client, make_server, wait_idle

WEIGHTS = "adapter_model.safetensors"
PEFT = "base_model.model."
LAYER = "model.layers.1.self_attn.v_proj"  # the LoRA module the edits break (v_proj: 64 -> 32 on the tiny base)
IDS = [11, 42, 7, 99, 3, 250, 18]
CANARY_TOKENS = 40
Edit = Callable[[Path], None]


# -- edits ----------------------------------------------------------------------------------------------------
def tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Edit:
    """An edit rewriting ``adapter_model.safetensors`` after ``change`` mutates its tensor dict."""

    def edit(d: Path) -> None:
        t = load_file(d / WEIGHTS)
        change(t)
        save_file(t, d / WEIGHTS)

    return edit


def config(name: str, **fields: object) -> Edit:
    """An edit setting ``fields`` in the artifact's JSON config ``name``."""

    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        data.update(fields)
        (d / name).write_text(json.dumps(data, indent=2))

    return edit


def both(*edits: Edit) -> Edit:
    def edit(d: Path) -> None:
        for e in edits:
            e(d)

    return edit


def truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.1


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    return tensors(lambda t: t.__setitem__(key, value(t[key])))


def _poke(key: str, index: tuple[int, ...], value: float) -> Edit:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][index] = value

    return tensors(change)


def _drop(key: str) -> Edit:
    return tensors(lambda t: t.pop(key))


def _add(key: str, shape: tuple[int, ...]) -> Edit:
    return tensors(lambda t: t.__setitem__(key, _rand(*shape)))


def _last_index_out_of_range(t: dict[str, torch.Tensor]) -> None:
    key = "model.layers.0.self_attn.q_proj.weight.indices"
    t[key] = t[key].clone()
    t[key][-1] = 64 * 64  # one past the end of q_proj's (64, 64) weight


# -- the corpus -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    good: str  # the good artifact it is made from (key of the ``goods`` fixture)
    edit: Edit | None  # None: the good artifact is broken for this base as it is (made for another one)
    words: str  # regex the error must match: the tensor or field at fault
    error: type[HotswapError] = ArtifactRejected  # what the loaders raise (at publish and at load)
    scan_refuses: bool = False  # the registry's own scan refuses it: publish raises InvalidArtifact, check or not


def named(text: str) -> str:
    """The regex of an error that says ``text`` verbatim."""
    return re.escape(text)


A, B = f"{PEFT}{LAYER}.lora_A.weight", f"{PEFT}{LAYER}.lora_B.weight"
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
O_BIAS = "model.layers.0.self_attn.o_proj.bias"
UP_BIAS = "model.layers.0.mlp.down_proj.adapter_up.bias"
CASES = [
    Case(  # built for a wider input
        "lora-a-width",
        "lora",
        _set(A, lambda a: _rand(4, 65)),
        named(f"{LAYER}.lora_A.weight has shape (4, 65), this base needs (4, 64)"),
    ),
    Case(
        "lora-b-transposed",
        "lora",
        _set(B, lambda b: b.T.contiguous()),
        named(f"{LAYER}.lora_B.weight has shape (4, 32), this base needs (32, 4)"),
    ),
    Case("lora-missing-b", "lora", _drop(B), named(f"lacks tensor '{LAYER}.lora_B.weight'")),
    Case(
        "lora-extra-tensor",
        "lora",
        _add(f"{PEFT}{LAYER}.lora_embedding_A", (4, 64)),
        named(f"unexpected tensor '{LAYER}.lora_embedding_A'"),
    ),
    Case("lora-nan", "lora", _poke(A, (0, 3), float("nan")), named(f"{LAYER}.lora_A.weight holds NaN")),
    Case("lora-inf", "lora", _poke(B, (5, 1), float("-inf")), named(f"{LAYER}.lora_B.weight holds NaN or infinite")),
    Case(
        "lora-int-tensor",
        "lora",
        _set(A, lambda a: (a * 100).to(torch.int32)),
        named(f"{LAYER}.lora_A.weight is torch.int32"),
    ),
    Case(  # r edited 4 -> 8: the first module (sorted) no longer has the config's rank
        "lora-rank",
        "lora",
        config("adapter_config.json", r=8),
        named("model.layers.0.mlp.down_proj.lora_A.weight has shape (4, 128), this base needs (8, 128)"),
    ),
    Case(  # a LoRA on the final norm: no linear, no embedding, no experts
        "lora-norm",
        "lora",
        both(
            _add(f"{PEFT}model.norm.lora_A.weight", (4, 64)),
            _add(f"{PEFT}model.norm.lora_B.weight", (64, 4)),
            config("adapter_config.json", target_modules=[*ALL_TARGETS, "norm"]),
        ),
        r"tensor model\.norm\.lora_[AB]\.weight targets 'model\.norm', not a linear layer",
    ),
    Case(  # layer 2 of a 2-layer base
        "lora-deeper-base",
        "lora",
        tensors(lambda t: t.update({k.replace(".layers.1.", ".layers.2."): v.clone() for k, v in t.items()})),
        r"model\.layers\.2\.[a-z_.]+\.lora_[AB]\.weight targets 'model\.layers\.2\.",
    ),
    Case(
        "lora-bias-all",
        "lora",
        config("adapter_config.json", bias="all"),
        named("bias='all' is not served"),
        UnsupportedAdapter,
    ),
    Case("lora-truncated", "lora", truncate, named(WEIGHTS), scan_refuses=True),
    Case(
        "prefix-other-base", "prefix-small", None, named("adapter_config.json num_layers is 1; this base has 2 layers")
    ),
    Case(
        "prefix-num-layers",
        "prefix",
        config("adapter_config.json", num_layers=3),
        named("adapter_config.json num_layers is 3; this base has 2 layers"),
    ),
    Case(
        "prefix-virtual-tokens",
        "prefix",
        config("adapter_config.json", num_virtual_tokens=6),
        named("prompt_embeddings has shape (5, 128), this base needs (6, 128)"),
    ),
    Case(
        "prompt-width",
        "prompt-small",
        None,
        named("prompt_embeddings has shape (3, 32), this base needs (3, 64)"),
    ),
    Case(
        "bitfit-bias-length",
        "bitfit",
        _set(O_BIAS, lambda b: b[:-1].clone()),
        named(f"{O_BIAS} has shape (63,), this base needs (64,)"),
    ),
    Case(
        "sparse-index-range",
        "sparse",
        tensors(_last_index_out_of_range),
        named("model.layers.0.self_attn.q_proj.weight.indices has indices outside its weight"),
    ),
    Case("bottleneck-missing", "bottleneck", _drop(UP_BIAS), named(f"lacks tensor '{UP_BIAS}'")),
    Case("proxy-vocabulary", "proxy-vocab128", None, named("proxy expert has vocabulary size 128, the base 256")),
]
IDS_OF = [c.id for c in CASES]
CASE = {c.id: c for c in CASES}
CLI_CASES = ["lora-a-width", "sparse-index-range", "lora-truncated"]


@pytest.fixture(scope="module")
def goods(tiny_base: Path, small_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good artifacts: for the tiny base, and (``*-small``, ``proxy-vocab128``) for other shapes."""
    d = tmp_path_factory.mktemp("good-artifacts")
    foreign = build_model("tiny", seed=5, vocab_size=128, **SMALL)
    (d / "proxy-vocab128").mkdir()
    write_proxy(d / "proxy-vocab128", foreign, foreign, 1.0)
    return {
        "lora": random_lora(tiny_base, d / "lora", RandomLoraConfig(rank=4, seed=1, init_std=0.2)),
        "prefix": random_prefix(tiny_base, d / "prefix", num_virtual_tokens=5, seed=2),
        "prompt": random_prompt(tiny_base, d / "prompt", num_virtual_tokens=3, seed=3),
        "bitfit": random_bitfit(tiny_base, d / "bitfit", seed=4, std=0.2),
        "sparse": random_sparse(tiny_base, d / "sparse", "fishmask", density=0.05, seed=5, std=0.3),
        "bottleneck": random_bottlenecks(tiny_base, {d / "bottleneck": 6}, bottleneck_dim=8, std=0.3)[0],
        "proxy": random_proxies(small_base, {d / "proxy": 7}, alpha=1.5, std=0.3)[0],
        "prefix-small": random_prefix(small_base, d / "prefix-small", num_virtual_tokens=5, seed=8),
        "prompt-small": random_prompt(small_base, d / "prompt-small", num_virtual_tokens=3, seed=9),
        "proxy-vocab128": d / "proxy-vocab128",
    }


@pytest.fixture(scope="module")
def corpus(goods: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Case id -> its broken artifact directory."""
    d = tmp_path_factory.mktemp("broken-artifacts")
    out = {}
    for case in CASES:
        shutil.copytree(goods[case.good], d / case.id)
        if case.edit is not None:
            case.edit(d / case.id)
        out[case.id] = d / case.id
    return out


@pytest.fixture(scope="module")
def check(tiny_base: Path) -> Callable[[Path, str], None]:
    return base_checker(tiny_base)


# -- publish --------------------------------------------------------------------------------------------------
def test_the_good_artifacts_publish_with_the_check(
    goods: dict[str, Path], tiny_base: Path, check: Callable[[Path, str], None], tmp_path: Path
) -> None:
    """The control: what the corpus starts from publishes on the tiny base (the ones for other shapes do not)."""
    reg = Registry(tmp_path / "reg")
    fp = fingerprint(tiny_base)
    for name in ("lora", "prefix", "prompt", "bitfit", "sparse", "bottleneck", "proxy"):
        assert reg.publish(goods[name], name, base_fingerprint=fp, check=check).version == 1
    assert len(reg.names()) == 7


@pytest.mark.parametrize("case", CASES, ids=IDS_OF)
def test_publish_with_the_base_refuses_and_writes_nothing(
    case: Case, corpus: dict[str, Path], tiny_base: Path, check: Callable[[Path, str], None], tmp_path: Path
) -> None:
    """Refused before anything is written, with the error class and a one-line message naming the fault."""
    root = tmp_path / "reg"
    reg = Registry(root)
    expected = InvalidArtifact if case.scan_refuses else case.error
    with pytest.raises((InvalidArtifact, UnsupportedAdapter), match=case.words) as info:
        reg.publish(corpus[case.id], case.id, base_fingerprint=fingerprint(tiny_base), check=check)
    assert type(info.value) is expected
    assert "\n" not in str(info.value)
    assert reg.names() == []
    with pytest.raises(AdapterNotFound):
        reg.versions(case.id)
    assert not [p for p in root.rglob("*") if p.is_file() and p.name != ".lock"]  # not even a staging copy


def test_a_refused_version_leaves_the_published_ones_and_aliases_alone(
    goods: dict[str, Path], corpus: dict[str, Path], tiny_base: Path, check: Callable[[Path, str], None], tmp_path: Path
) -> None:
    """A broken next version of an adapter in use: refused, no version 2, ``prod`` still on version 1."""
    reg = Registry(tmp_path / "reg")
    fp = fingerprint(tiny_base)
    reg.publish(goods["lora"], "math", base_fingerprint=fp, aliases=["prod"], check=check)
    with pytest.raises(ArtifactRejected, match="holds NaN"):
        reg.publish(corpus["lora-nan"], "math", base_fingerprint=fp, aliases=["prod"], check=check)
    assert [m.version for m in reg.versions("math")] == [1] and reg.aliases("math") == {"prod": 1}
    assert reg.publish(goods["lora"], "math", base_fingerprint=fp, check=check).version == 2  # the number is free


@pytest.fixture
def quiet_progress() -> Iterator[None]:
    """In-process CLI runs: transformers, imported long before ``main`` sets HF_HUB_DISABLE_PROGRESS_BARS, would
    draw its loading bar on stderr (a fresh ``hotswap`` process does not: test_cli_entry_point_...)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _push_argv(registry: Path, src: Path, name: str, base: Path) -> list[str]:
    return ["--registry", str(registry), "push", str(src), "--name", name, "--base", str(base)]


def _push(registry: Path, src: Path, name: str, base: Path) -> subprocess.CompletedProcess[str]:
    """``hotswap push --base`` as a user runs it: a fresh process, its real stdout and stderr."""
    argv = [sys.executable, "-m", "hotswap.cli", *_push_argv(registry, src, name, base)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def _assert_one_line_naming(stderr: str, words: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith("hotswap: error: ") and re.search(words, lines[0]), lines[0]


@pytest.mark.parametrize("case", [CASE[i] for i in CLI_CASES], ids=CLI_CASES)
def test_cli_push_with_base_refuses_in_one_line(
    case: Case,
    goods: dict[str, Path],
    corpus: dict[str, Path],
    tiny_base: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    quiet_progress: None,
) -> None:
    """``hotswap push --base``: the exit code of the error's class and one stderr line naming the tensor."""
    reg = tmp_path / "reg"
    code, out, err = _cli(capsys, *_push_argv(reg, corpus[case.id], case.id, tiny_base))
    expected = InvalidArtifact if case.scan_refuses else case.error
    assert code == mapping_for(expected("")).exit_code != 0 and out == ""
    _assert_one_line_naming(err, case.words)
    assert Registry(reg).names() == []
    # the control: the same command publishes the artifact it was made from
    code, out, err = _cli(capsys, *_push_argv(reg, goods[case.good], case.id, tiny_base))
    assert code == 0 and f"published {case.id}@1" in out and err == ""


def test_cli_entry_point_refusal_is_one_line(corpus: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    """The same in a fresh process: no library warning or progress bar reaches stderr around the error."""
    proc = _push(tmp_path / "reg", corpus["lora-nan"], "lora-nan", tiny_base)
    assert proc.returncode == mapping_for(ArtifactRejected("")).exit_code, proc.stderr
    assert proc.stdout == ""
    _assert_one_line_naming(proc.stderr, CASE["lora-nan"].words)
    assert Registry(tmp_path / "reg").names() == []


# -- production bugs found while building the corpus (these fail until fixed) -----------------------------------
def test_cli_refusal_stays_one_line_for_a_config_from_a_newer_peft(
    corpus: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """An adapter_config.json with a field this PEFT does not know (saved by a newer PEFT), refused for its NaN:
    PEFT's UserWarning ("Unexpected keyword arguments [...]") must not put extra lines around the error."""
    src = tmp_path / "newer-peft"
    shutil.copytree(corpus["lora-nan"], src)
    config("adapter_config.json", field_of_a_newer_peft=1)(src)
    proc = _push(tmp_path / "reg", src, "newer-peft", tiny_base)
    assert proc.returncode == mapping_for(ArtifactRejected("")).exit_code, proc.stderr
    _assert_one_line_naming(proc.stderr, CASE["lora-nan"].words)


def test_prefix_num_layers_of_the_wrong_type_is_named(
    goods: dict[str, Path], check: Callable[[Path, str], None], tmp_path: Path
) -> None:
    """num_layers "2" (a string) on a 2-layer base: refused, but the message must say what is wrong with it,
    not "a prefix for 2 layers; this base has 2"."""
    src = tmp_path / "prefix"
    shutil.copytree(goods["prefix"], src)
    config("adapter_config.json", num_layers="2")(src)
    with pytest.raises(ArtifactRejected) as info:
        check(src, "prefix")
    assert "num_layers" in str(info.value) and "'2'" in str(info.value), str(info.value)


# -- serving ---------------------------------------------------------------------------------------------------
def _plant_over_good(reg: Registry, good: Path, broken: Path, name: str, fp: str) -> None:
    """Publish ``good`` as ``name``, then replace its stored files with ``broken``'s and rewrite the manifest's
    sha256 and sizes to match: a registry holding a consistent (verifiable) but broken artifact."""
    manifest = reg.publish(good, name, base_fingerprint=fp)
    stored = reg.backend.local_path(name, manifest.version)  # type: ignore[attr-defined]
    files = {}
    for path in sorted(p for p in broken.rglob("*") if p.is_file()):
        rel = path.relative_to(broken).as_posix()
        target = stored / rel
        assert target.is_file(), rel  # the same file set as the good one
        os.chmod(target, 0o644)
        shutil.copyfile(path, target)
        os.chmod(target, 0o444)
        files[rel] = {"sha256": sha256_file(target), "size": target.stat().st_size}
    mpath = stored / MANIFEST_FILE
    data = json.loads(mpath.read_text())
    assert set(data["files"]) == set(files)
    data["files"] = files
    os.chmod(mpath, 0o644)
    mpath.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.chmod(mpath, 0o444)


@pytest.fixture(scope="module")
def planted(
    goods: dict[str, Path], corpus: dict[str, Path], tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A registry holding a good LoRA ("good") and every broken artifact, under the case id, for the tiny base."""
    root = tmp_path_factory.mktemp("planted") / "registry"
    reg = Registry(root)
    fp = fingerprint(tiny_base)
    reg.publish(goods["lora"], "good", base_fingerprint=fp)
    for case in CASES:
        if case.scan_refuses:
            with pytest.raises(InvalidArtifact):
                reg.publish(corpus[case.id], case.id, base_fingerprint=fp)
            _plant_over_good(reg, goods[case.good], corpus[case.id], case.id, fp)
        else:
            reg.publish(corpus[case.id], case.id, base_fingerprint=fp)  # no check: the registry knows no models
        reg.fetch(case.id, base_fingerprint=fp)  # verifies: only the loaders stand between it and the engine
    return root


@pytest.fixture(scope="module")
def server(tiny_base: Path, planted: Path) -> Iterator[Server]:
    srv = make_server(tiny_base, planted, max_batch=8, max_resident=4).start()
    yield srv
    srv.stop(grace=1)


def _canary(c: Client, adapters: list[str]) -> Stream:
    return c.stream(prompt_ids=IDS, adapters=adapters, max_new_tokens=CANARY_TOKENS, ignore_eos=True)


CANARIES = {"base": [], "good": ["good"]}


@pytest.fixture(scope="module")
def solo(server: Server) -> dict[str, list[int]]:
    """Each canary's tokens when it runs alone."""
    out = {}
    with client(server, token=None) as c:
        for name, adapters in CANARIES.items():
            wait_idle(server)
            stream = _canary(c, adapters)
            out[name] = [t for chunk in stream for t in chunk.token_ids]
            assert len(out[name]) == CANARY_TOKENS
    assert out["base"] != out["good"]  # the good adapter changes the output: its canary would notice a mix-up
    return out


def _raw_status(srv: Server, ref: str) -> tuple[str, str]:
    """The gRPC status code and details of a Generate for ``ref``, over a bare channel (not our client)."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        call = channel.unary_unary(
            "/hotswap.v1.Inference/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as rpc:
            call(build_request(prompt_ids=IDS, adapters=[ref], max_new_tokens=4), timeout=60)
    return rpc.value.code().name, rpc.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CASES, ids=IDS_OF)
def test_server_refuses_a_planted_broken_adapter_and_others_go_on(
    case: Case, server: Server, solo: dict[str, list[int]]
) -> None:
    """A request for the broken adapter (alone, or mixed with a good one) fails with FAILED_PRECONDITION naming
    the fault; a base-model and a good-adapter stream running at the time get exactly their solo tokens."""
    with client(server, token=None) as c:
        streams = {name: _canary(c, adapters) for name, adapters in CANARIES.items()}
        iters = {name: iter(s) for name, s in streams.items()}
        got = {name: list(next(it).token_ids) for name, it in iters.items()}  # both are running now
        with pytest.raises(HotswapError, match=case.words) as info:
            c.generate(prompt_ids=IDS, adapters=[case.id], max_new_tokens=8, ignore_eos=True)
        assert type(info.value) is case.error  # not AdapterFault (a served adapter gone bad), not INTERNAL
        streamed = c.stream(prompt_ids=IDS, adapters=[case.id, "good"], max_new_tokens=8)
        with pytest.raises(case.error, match=case.words):
            list(streamed)
        for name, it in iters.items():
            got[name] += [t for chunk in it for t in chunk.token_ids]
    assert got == solo
    assert streams["good"].response is not None and streams["good"].response.adapters == [("good@1", 1.0)]
    code, details = _raw_status(server, case.id)
    assert code == "FAILED_PRECONDITION" and re.search(case.words, details), details
    assert f"{case.id}@1" not in server.engine.resident()  # type: ignore[union-attr]


@pytest.mark.parametrize("case", CASES, ids=IDS_OF)
def test_admin_load_of_a_broken_adapter_fails_and_leaves_nothing_resident(case: Case, server: Server) -> None:
    """``Load`` (admin prefetch, pinned) of the broken adapter fails the same way; nothing is installed."""
    with client(server, token=None) as c:
        with pytest.raises(HotswapError, match=case.words) as info:
            c.load(case.id, pin=True)
        assert type(info.value) is case.error
        assert mapping_for(info.value).grpc_status == "FAILED_PRECONDITION"
        engine = server.engine
        assert engine is not None
        assert f"{case.id}@1" not in engine.resident()
        assert engine.cache_tier(f"{case.id}@1") == "registry"  # not even in host RAM
        assert [a.resident for a in c.list() if a.name == case.id] == [[]]
        # the server still answers, with and without an adapter
        assert c.health() == "SERVING" and engine.healthy
        assert len(c.generate(prompt_ids=IDS, adapters=["good"], max_new_tokens=3).token_ids) == 3
        assert len(c.generate(prompt_ids=IDS, max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize("case_id", ["lora-nan", "proxy-vocabulary"])
def test_many_concurrent_requests_for_a_broken_adapter_all_fail(
    case_id: str, server: Server, solo: dict[str, list[int]]
) -> None:
    """A burst of requests for one broken adapter: every one fails with its error (none hangs or gets
    INTERNAL), and the canaries running meanwhile are untouched."""
    case = CASE[case_id]
    errors: list[BaseException | None] = []
    lock = threading.Lock()

    def request() -> None:
        with client(server, token=None) as c:
            try:
                c.generate(prompt_ids=IDS, adapters=[case.id], max_new_tokens=4, timeout=60)
                outcome: BaseException | None = None
            except HotswapError as e:
                outcome = e
        with lock:
            errors.append(outcome)

    with client(server, token=None) as c:
        streams = {name: _canary(c, adapters) for name, adapters in CANARIES.items()}
        iters = {name: iter(s) for name, s in streams.items()}
        got = {name: list(next(it).token_ids) for name, it in iters.items()}
        threads = [threading.Thread(target=request) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        for name, it in iters.items():
            got[name] += [t for chunk in it for t in chunk.token_ids]
    assert len(errors) == 8
    for e in errors:
        assert type(e) is case.error and re.search(case.words, str(e)), e
    assert got == solo
    wait_idle(server)
