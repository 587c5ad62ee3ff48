"""hotswap's attention function against its per-row reference, and models that cannot be served refused at load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

from hotswap.errors import InvalidBaseModel
from hotswap.serve.model.attention import attention_ref, hotswap_attention
from hotswap.serve.model.kvcache import PagedCache, StaticCache
from hotswap.serve.model.runner import Runner

HEADS, KV_HEADS, HEAD_DIM, MAX_LEN, BLOCK = 4, 2, 8, 32, 4


class _Layer(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


def _cache(kind: str, rows: int = 4) -> StaticCache | PagedCache:
    if kind == "static":
        return StaticCache(2, rows, KV_HEADS, MAX_LEN, HEAD_DIM, torch.float32, "cpu")
    cache = PagedCache(2, rows, rows * MAX_LEN // BLOCK + 3, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu")
    for row in range(rows):
        cache.reserve(row, MAX_LEN)
    return cache


def _row_kv(cache: StaticCache | PagedCache, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's keys and values (KV, MAX_LEN, hd), read the slow way."""
    if isinstance(cache, StaticCache):
        return cache.k[layer, row, :, :MAX_LEN], cache.v[layer, row, :, :MAX_LEN]
    table = cache.tables[row]
    return tuple(t[layer][:, table].reshape(KV_HEADS, -1, HEAD_DIM) for t in (cache.k, cache.v))


@pytest.mark.parametrize("kind", ["static", "paged"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_fast_attention_equals_the_row_loop(
    kind: str, window: int | None, softcap: float | None, contiguous: bool, sinks: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    s_aux = torch.randn(HEADS, generator=g) * 2 if sinks else None  # gpt-oss's learned sink logit per head
    cache = _cache(kind)
    cache.k.normal_(generator=g)  # earlier tokens' keys/values, already in the rows
    cache.v.normal_(generator=g)
    if isinstance(cache, PagedCache):
        cache.k[:, :, cache.null] = cache.v[:, :, cache.null] = 0
    # three rows of one forward: a prefill of 5 tokens at 0.., a prefill of 3 at 9.. (left-padded), one decode at 20
    positions = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 9, 10, 11], [-1, -1, -1, -1, 20]])
    rows = [0, 1, 2] if contiguous else [3, 0, 2]
    query = torch.randn(3, HEADS, 5, HEAD_DIM, generator=g)
    key, value = torch.randn(2, 3, KV_HEADS, 5, HEAD_DIM, generator=g)
    before = _row_kv(cache, 1, rows[1])[0].clone()
    batch = cache.bind(rows, positions, contiguous)
    kw = dict(sliding_window=window, softcap=softcap, s_aux=s_aux, hotswap_batch=batch)
    out, _ = hotswap_attention(_Layer(1), query, key, value, None, 0.3, **kw)
    for b in range(3):
        real = positions[b] >= 0
        pos = positions[b][real].tolist()
        k, v = _row_kv(cache, 1, rows[b])  # written by the call above
        assert torch.equal(k[:, pos], key[b][:, real]), "keys land at their positions of their own row"
        ref = attention_ref(k, v, query[b][:, real], pos, 0.3, window, softcap, s_aux)
        torch.testing.assert_close(out[b][real], ref, atol=1e-5, rtol=1e-5)
    untouched = [p for p in range(MAX_LEN) if p not in (9, 10, 11)]
    assert torch.equal(_row_kv(cache, 1, rows[1])[0][:, untouched], before[:, untouched]), "padding wrote elsewhere"


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_padding_writes_only_scratch_space(kind: str) -> None:
    cache = _cache(kind, rows=2)
    positions = torch.tensor([[-1, -1, 0], [0, 1, 2]])
    q = torch.randn(2, HEADS, 3, HEAD_DIM)
    k, v = torch.randn(2, 2, KV_HEADS, 3, HEAD_DIM)
    out, _ = hotswap_attention(_Layer(0), q, k, v, None, 1.0, hotswap_batch=cache.bind([0, 1], positions))
    assert torch.isfinite(out).all(), "a padding query sees position 0 of its row, never an empty set"
    assert _row_kv(cache, 0, 0)[0][:, 1:].abs().sum() == 0, "row 0's padding touched none of its real positions"
    scratch = cache.k[0, 0, :, MAX_LEN] if kind == "static" else cache.k[0, :, cache.scratch]
    assert scratch.abs().sum() > 0
    if isinstance(cache, PagedCache):
        assert cache.k[:, :, cache.null].abs().sum() == 0, "the null block padding tables read stays zero"


class _SinkLayer(_Layer):
    """What gpt-oss's eager attention reads off its module."""

    def __init__(self, layer_idx: int, sinks: torch.Tensor) -> None:
        super().__init__(layer_idx)
        self.sinks = nn.Parameter(sinks)
        self.num_key_value_groups = HEADS // KV_HEADS


@pytest.mark.parametrize("kind", ["static", "paged"])
@pytest.mark.parametrize("window", [None, 4])
def test_sinks_equal_transformers_eager_gpt_oss_attention(kind: str, window: int | None) -> None:
    """Two rows prefilled in two chunks (the second reads the first's keys from the cache) give gpt-oss's own eager
    attention over the whole sequence, with its additive causal (sliding-window) mask and its sinks."""
    g = torch.Generator().manual_seed(1)
    n, half = 12, 6  # past the window: the windowed layer masks the oldest keys, never the sink
    layer = _SinkLayer(0, torch.randn(HEADS, generator=g) * 2)
    query = torch.randn(2, HEADS, n, HEAD_DIM, generator=g)
    key, value = torch.randn(2, 2, KV_HEADS, n, HEAD_DIM, generator=g)
    cache = _cache(kind, rows=2)
    out = []
    for lo, hi in [(0, half), (half, n)]:
        positions = torch.arange(lo, hi).expand(2, -1)
        batch = cache.bind([0, 1], positions, contiguous=True)
        o, _ = hotswap_attention(
            layer, query[..., lo:hi, :], key[..., lo:hi, :], value[..., lo:hi, :], None, 0.3,
            sliding_window=window, s_aux=layer.sinks, hotswap_batch=batch,
        )  # fmt: skip
        out.append(o)
    q, k = torch.arange(n)[:, None], torch.arange(n)
    visible = (k <= q) & (q - k < (window or n))
    mask = torch.zeros(n, n).masked_fill(~visible, torch.finfo(torch.float32).min)  # as HF's eager masks
    ref, _ = gpt_oss.eager_attention_forward(layer, query, key, value, mask, 0.3)  # (B, T, H, hd)
    torch.testing.assert_close(torch.cat(out, 1), ref, atol=1e-5, rtol=1e-5)
    without, _ = gpt_oss.eager_attention_forward(
        _SinkLayer(0, torch.full((HEADS,), -1e9)), query, key, value, mask, 0.3
    )
    assert (ref - without).abs().max() > 0.1, "the sinks must change the output"


def test_per_token_sinks_are_refused() -> None:
    """Sinks computed per token (``sinks`` (B, H, T, 1)), or any ``s_aux`` but one logit per head, are not ours."""
    q = torch.randn(1, HEADS, 1, HEAD_DIM)
    kv = q[:, :KV_HEADS]
    batch = _cache("static").bind([0], torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(InvalidBaseModel, match="'sinks'"):
        hotswap_attention(_Layer(0), q, kv, kv, None, 1.0, sinks=q[..., :1], hotswap_batch=batch)
    with pytest.raises(InvalidBaseModel, match="s_aux other than one logit per head"):
        hotswap_attention(_Layer(0), q, kv, kv, None, 1.0, s_aux=q[..., :1], hotswap_batch=batch)


def test_the_attention_needs_its_batch() -> None:
    """A family whose forward drops the model call's keywords cannot reach our attention's batch: refused."""
    q = torch.randn(1, HEADS, 1, HEAD_DIM)
    with pytest.raises(InvalidBaseModel, match="hotswap_batch"):
        hotswap_attention(_Layer(0), q, q[:, :KV_HEADS], q[:, :KV_HEADS], None, 1.0)


_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)  # fmt: skip
REFUSED = {
    "bart": (
        dict(
            vocab_size=64,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        ),
        "is an encoder-decoder",
    ),
    "qwen3_next": ({**_SMALL, "layer_types": ["linear_attention", "full_attention"]}, "has linear_attention layers"),
    "gpt2": (dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4), "decoder layers are not at model.layers"),
}


def test_gpt_oss_attention_sinks_are_served() -> None:
    """gpt-oss, once refused for its sinks (``s_aux``), loads: the load probe runs a token through every layer."""
    config = {**_SMALL, "num_local_experts": 2, "num_experts_per_tok": 1, "head_dim": 8, "sliding_window": 4,
              "layer_types": ["sliding_attention", "full_attention"]}  # fmt: skip
    Runner(AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **config)).eval(), 2, 16)


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_models_that_cannot_be_served_are_refused_in_one_line(model_type: str) -> None:
    config, why = REFUSED[model_type]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    with pytest.raises(InvalidBaseModel, match=f"^model type '{model_type}'.*{why}") as e:
        Runner(model, 2, 16)
    assert "\n" not in str(e.value)
