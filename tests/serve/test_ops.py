"""Fast batched ops vs their row-by-row references (``*_ref.py`` beside them), over the batch shapes that matter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hotswap.methods.api import BatchPlan, LinearDelta, SlotKind, rows, rows_ref
from hotswap.methods.bitfit.kind import BiasKind
from hotswap.methods.bottleneck import ops as bottleneck
from hotswap.methods.bottleneck import ops_ref as bottleneck_ref
from hotswap.methods.lora import ops as lora
from hotswap.methods.lora import ops_ref as lora_ref
from hotswap.methods.lora.kind import LoraFactors, LoraKind
from hotswap.methods.sparse import ops as sparse
from hotswap.methods.sparse import ops_ref as sparse_ref
from hotswap.serve.model.layers import MultiAdapterLinear

# One tolerance table: max |fast - ref| / (max |ref| + 1) per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SLOTS, CAPACITY, IN, OUT = 8, 16, 48, 40
RANKS = [0, 2, 4, 16, 8, 16, 2, 4]  # slot 0 is "no adapter"; the rest mixed ranks padded to CAPACITY


def _tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    A = torch.zeros(SLOTS, CAPACITY, IN)
    B = torch.zeros(SLOTS, CAPACITY, OUT)
    for s, r in enumerate(RANKS):
        A[s, :r] = torch.randn(r, IN, generator=g)
        B[s, :r] = torch.randn(r, OUT, generator=g)
    vectors = torch.randn(SLOTS, OUT, generator=g)
    vectors[0] = 0
    return A.to(dtype), B.to(dtype), vectors.to(dtype)


def _slots(pattern: str, rows: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if pattern == "distinct":
        base = torch.arange(rows) % (SLOTS - 1) + 1
    elif pattern == "uniform":
        base = torch.randint(1, SLOTS, (rows,), generator=g)
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, SLOTS) ** 1.1
        base = torch.multinomial(p / p.sum(), rows, replacement=True, generator=g) + 1
    elif pattern == "identical":
        base = torch.full((rows,), 3)
    elif pattern == "with-base-rows":
        base = torch.where(torch.arange(rows) % 2 == 0, torch.arange(rows) % (SLOTS - 1) + 1, 0)
    else:
        raise AssertionError(pattern)
    extra = torch.randint(0, SLOTS, (rows, k - 1), generator=g)  # composition partners (slot 0 allowed)
    return torch.cat([base[:, None], extra], dim=1)


def _weights(rows: int, k: int) -> torch.Tensor:
    if k == 1:
        return torch.ones(rows, 1)
    return torch.tensor([1.0, 0.5, -1.0][:k]).repeat(rows, 1)


def _check(fast: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.abs().max().item() + 1
    assert (fast.float() - ref).abs().max().item() / scale <= TOLERANCE[dtype]


PATTERNS = ["distinct", "uniform", "zipf", "identical", "with-base-rows"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_paths_match_reference(pattern: str, tokens: int, k: int, dtype: torch.dtype) -> None:
    A, B, _ = _tables(dtype)
    rows = 9
    slots, weights = _slots(pattern, rows, k), _weights(rows, k)
    x = torch.randn(rows, tokens, IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    rank = max(RANKS[s] for s in slots.flatten().tolist())
    ref = lora_ref.lora_delta(x, A, B, slots, weights, rank)
    _check(lora.lora_delta(x, A, B, slots, weights.to(dtype), rank), ref, dtype)
    _check(lora.lora_delta_unique(x, A, B, slots, weights.to(dtype), rank), ref, dtype)
    # In-place accumulation gives the same delta on top of an existing output.
    out = torch.randn(rows, tokens, OUT).to(dtype)
    used = sorted(set(slots.flatten().tolist()) - {0})
    factors = lora.gather_unique(A, B, lora.unique_rows(slots, weights, rank, used, dtype), rank)
    assert (factors.drop is None) == (pattern == "identical" and k == 1)  # alike rows: no per-row mask at all
    # one adapter at weight 1 on every row reads its table rows in place
    alike = pattern == "identical" and k == 1
    assert (factors.a_t.untyped_storage().data_ptr() == A.untyped_storage().data_ptr()) == alike
    if alike:  # the same adapter at another weight on every row: the weight folded into a copy of B
        half = lora.gather_unique(A, B, lora.unique_rows(slots, weights / 2, rank, used, dtype), rank)
        assert half.drop is None and half.b.untyped_storage().data_ptr() != B.untyped_storage().data_ptr()
        _check(lora.lora_apply_unique(x, half), ref / 2, dtype)
    acc = lora.lora_apply_unique(x, factors, out=out.clone())
    _check(acc - out, ref, dtype)
    acc = lora.lora_apply(x, *lora.gather_rows(A, B, slots, weights.to(dtype), rank), out=out.clone())
    _check(acc - out, ref, dtype)
    if k == 1:  # every weight 1: B's rows as they are
        _check(lora.lora_apply(x, *lora.gather_rows(A, B, slots, None, rank)), ref, dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 3])
def test_weighted_rows_match_reference(pattern: str, k: int) -> None:
    _, _, vectors = _tables(torch.float32)
    slots, weights = _slots(pattern, 9, k), _weights(9, k)
    _check(rows.weighted_rows(vectors, slots, weights), rows_ref.weighted_rows(vectors, slots, weights), torch.float32)
    ones = torch.ones(slots.shape)  # None: every weight 1
    _check(rows.weighted_rows(vectors, slots, None), rows_ref.weighted_rows(vectors, slots, ones), torch.float32)


def test_rows_without_adapter_get_exactly_zero() -> None:
    A, B, vectors = _tables(torch.float32)
    slots, weights = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
    x = torch.randn(4, 3, IN)
    assert torch.equal(lora.lora_delta(x, A, B, slots, weights, 16), torch.zeros(4, 3, OUT))
    assert torch.equal(rows.weighted_rows(vectors, slots, weights), torch.zeros(4, OUT))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 3])
def test_rank_truncation_matches_reference(pattern: str, k: int) -> None:
    """DyLoRA rows at a chosen rank (0 = full, above the adapter's rank = full) next to full rows."""
    A, B, _ = _tables(torch.float32)
    rows = 12
    slots, weights = _slots(pattern, rows, k), _weights(rows, k)
    row_ranks = [0, 1, 2, 3, 5, 8, 16, 40, 0, 1, 4, 0]
    x = torch.randn(rows, 3, IN, generator=torch.Generator().manual_seed(2))
    trunc = lora.rank_truncation(torch.tensor(RANKS), slots, torch.tensor(row_ranks), CAPACITY)
    fast = lora.lora_delta(x, A, B, slots, weights, CAPACITY, trunc)
    _check(fast, lora_ref.truncated_delta(x, A, B, slots, weights, RANKS, row_ranks), torch.float32)
    # rank 0 everywhere is exactly the untruncated op
    full = lora.rank_truncation(torch.tensor(RANKS), slots, torch.zeros(rows, dtype=torch.long), CAPACITY)
    torch.testing.assert_close(lora.lora_delta(x, A, B, slots, weights, CAPACITY, full),
                               lora.lora_delta(x, A, B, slots, weights, CAPACITY))  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("cap", [1 << 21, 0])  # block-diagonal form, and the stacked-unique fallback
def test_sparse_deltas_match_reference(pattern: str, k: int, cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Child-tuning / FishMask deltas: per-slot sparse (out, in) matrices at mixed densities."""
    g = torch.Generator().manual_seed(3)
    entries = {}
    for slot, density in zip(range(1, SLOTS), [0.005, 0.05, 0.2, 0.01, 0.5, 0.02, 0.1], strict=True):
        if slot == 4:
            continue  # a resident slot without a sparse delta (e.g. a LoRA adapter)
        nnz = max(1, int(density * OUT * IN))
        idx = torch.randperm(OUT * IN, generator=g)[:nnz]
        entries[slot] = (idx, torch.randn(nnz, generator=g))
    monkeypatch.setattr(sparse, "BLOCK_DIAGONAL_MAX_ENTRIES", cap)
    rows = 10
    slots, weights = _slots(pattern, rows, k), _weights(rows, k)
    x = torch.randn(rows, 4, IN, generator=g)
    fast = sparse.sparse_delta(x, entries, OUT, slots, weights)
    _check(fast, sparse_ref.sparse_delta(x, entries, OUT, slots, weights), torch.float32)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 3])
def test_bottleneck_adapters_match_reference(pattern: str, k: int) -> None:
    """Bottlenecks of mixed sizes, activations and placements (serial reads the output, parallel the input)."""
    g = torch.Generator().manual_seed(4)
    kinds = [
        (8, "relu", True),
        (4, "gelu", True),
        (16, "silu", False),
        (2, "relu", False),
        (8, "relu", True),
        (6, "gelu", False),
    ]
    entries = {}
    for slot, (m, act, serial) in zip(range(2, SLOTS), kinds, strict=True):  # slot 1: no bottleneck
        d = OUT if serial else IN
        entries[slot] = bottleneck.Bottleneck(torch.randn(m, d, generator=g) * 0.2, torch.randn(m, generator=g),
                                              torch.randn(OUT, m, generator=g) * 0.2, torch.randn(OUT, generator=g),
                                              act, serial)  # fmt: skip
    rows = 10
    slots, weights = _slots(pattern, rows, k), _weights(rows, k)
    x, y = torch.randn(rows, 3, IN, generator=g), torch.randn(rows, 3, OUT, generator=g)
    fast = bottleneck.bottleneck_delta(x, y, entries, slots, weights)
    _check(fast, bottleneck_ref.bottleneck_delta(x, y, entries, slots, weights), torch.float32)


def test_an_overflowing_adapter_never_reaches_rows_that_do_not_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault isolation inside the batched ops: slot 5's factors overflow x @ A to inf. The paths that compute
    every batch adapter for every row (per-unique LoRA, stacked sparse) must still give the other rows
    exactly their reference delta (a 0 coefficient times inf would be NaN)."""
    A, B, _ = _tables(torch.float32)
    A[5, : RANKS[5]] = 1e37  # finite weights, but x @ A overflows
    slots = torch.tensor([[1], [5], [2], [0], [3], [5]])
    weights = torch.ones(6, 1)
    x = torch.randn(6, 2, IN, generator=torch.Generator().manual_seed(5))
    clean = [0, 2, 3, 4]  # rows without slot 5
    ref = lora_ref.lora_delta(x, A, B, slots, weights, CAPACITY)
    fast = lora.lora_delta_unique(x, A, B, slots, weights, CAPACITY)
    assert torch.isfinite(fast[clean]).all()
    _check(fast[clean], ref[clean], torch.float32)
    g = torch.Generator().manual_seed(6)
    entries = {s: (torch.randperm(OUT * IN, generator=g)[:50], torch.randn(50, generator=g)) for s in (1, 2, 3, 5)}
    entries[5] = (entries[5][0], torch.full((50,), 3e38))
    monkeypatch.setattr(sparse, "BLOCK_DIAGONAL_MAX_ENTRIES", 0)  # the stacked form multiplies every row by all
    fast = sparse.sparse_delta(x * 10, entries, OUT, slots, weights)
    assert torch.isfinite(fast[clean]).all()
    _check(fast[clean], sparse_ref.sparse_delta(x * 10, entries, OUT, slots, weights)[clean], torch.float32)


# -- LoRA on an MoE layer's experts: per-slot tables (S, E, R, in) / (S, E, R, out), tokens routed to one expert --
EXPERTS = 3


def _expert_tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's factors for every expert, each slot at its own rank (RANKS) padded to CAPACITY."""
    g = torch.Generator().manual_seed(7)
    A = torch.zeros(SLOTS, EXPERTS, CAPACITY, IN)
    B = torch.zeros(SLOTS, EXPERTS, CAPACITY, OUT)
    for s, r in enumerate(RANKS):
        A[s, :, :r] = torch.randn(EXPERTS, r, IN, generator=g)
        B[s, :, :r] = torch.randn(EXPERTS, r, OUT, generator=g)
    return A.to(dtype), B.to(dtype)


def _routed_rows(rows: int, tokens: int) -> torch.Tensor:
    """The batch rows (n,) of the tokens routed to one expert: ragged (a row may send several tokens, or none)."""
    g = torch.Generator().manual_seed(8)
    return torch.sort(torch.randint(0, rows, (tokens,), generator=g)).values


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("expert", [0, EXPERTS - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_lora_matches_reference(pattern: str, k: int, expert: int, dtype: torch.dtype) -> None:
    A, B = _expert_tables(dtype)
    rows = 9
    slots, weights = _slots(pattern, rows, k), _weights(rows, k)
    token_rows = _routed_rows(rows, 13)
    x = torch.randn(13, IN, generator=torch.Generator().manual_seed(9)).to(dtype)
    rank = max(RANKS[s] for s in slots.flatten().tolist())
    ref = lora_ref.expert_lora_delta(x, A, B, slots, weights, rank, expert, token_rows)
    fast = lora.expert_lora_delta(x, A, B, slots, weights.to(dtype), rank, expert, token_rows)
    assert fast.shape == (13, OUT) and fast.dtype == dtype
    _check(fast, ref, dtype)
    f = lora.ExpertRows(A, B, slots, weights.to(dtype), rank)
    per_token = lora.expert_lora_rows(x, f, torch.full((13,), expert), token_rows)
    assert per_token.shape == (13, OUT) and per_token.dtype == dtype
    _check(per_token, ref, dtype)


@pytest.mark.parametrize("budget", [1, 1 << 22], ids=["a-pair-per-chunk", "one-chunk"])
def test_expert_lora_rows_of_pairs_to_many_experts(budget: int) -> None:
    """The per-token path on pairs routed to different experts at once, in chunks or not: each pair equals the
    reference of its own expert and row."""
    A, B = _expert_tables(torch.float32)
    slots, weights = _slots("distinct", 9, 2), _weights(9, 2)
    rows = _routed_rows(9, 13)
    experts = torch.randint(0, EXPERTS, (13,), generator=torch.Generator().manual_seed(11))
    x = torch.randn(13, IN, generator=torch.Generator().manual_seed(12))
    got = lora.expert_lora_rows(x, lora.ExpertRows(A, B, slots, weights, CAPACITY), experts, rows, budget=budget)
    for i in range(13):
        want = lora_ref.expert_lora_delta(
            x[i : i + 1], A, B, slots, weights, CAPACITY, int(experts[i]), rows[i : i + 1]
        )
        _check(got[i : i + 1], want, torch.float32)


def test_expert_lora_rows_of_zero_one_and_two_slots() -> None:
    """Rows of one batch using no adapter, slot 0 only, one adapter, one at weight 0.5, and two (mixed ranks padded
    to the table's): each token gets exactly its own row's weighted sum, a row without adapters exactly zero."""
    A, B = _expert_tables(torch.float32)
    slots = torch.tensor([[0, 0], [1, 0], [3, 0], [2, 5], [4, 4], [0, 0], [6, 7]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.5], [0.5, 0.5], [1.0, 1.0], [-1.0, 0.5]])
    token_rows = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 5, 6])  # row 5: slot 0 only (weight 1 on "no adapter")
    x = torch.randn(len(token_rows), IN, generator=torch.Generator().manual_seed(10))
    for expert in range(EXPERTS):
        ref = lora_ref.expert_lora_delta(x, A, B, slots, weights, CAPACITY, expert, token_rows)
        fast = lora.expert_lora_delta(x, A, B, slots, weights, CAPACITY, expert, token_rows)
        f = lora.ExpertRows(A, B, slots, weights, CAPACITY)
        per_token = lora.expert_lora_rows(x, f, torch.full((len(token_rows),), expert), token_rows)
        for got in (fast, per_token):
            _check(got, ref, torch.float32)
            assert torch.equal(got[[0, 8, 9]], torch.zeros(3, OUT)), "base rows' tokens get an exact zero"
        # slot 4 twice at 0.5 each is slot 4 once at weight 1
        once = lora_ref.expert_lora_delta(x[7:8], A, B, torch.tensor([[4]]), torch.ones(1, 1), CAPACITY, expert,
                                          torch.tensor([0]))  # fmt: skip
        _check(fast[7:8], once, torch.float32)


def test_expert_lora_gather_reads_each_distinct_adapter_once() -> None:
    """The prepared factors hold the batch's U distinct adapters side by side at the batch's rank, per expert."""
    A, B = _expert_tables(torch.float32)
    slots = torch.tensor([[1, 0], [2, 1], [1, 0]])
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.25], [2.0, 0.0]])
    f = lora.gather_experts(A, B, slots, weights, 4, [1, 2])
    assert f.a.shape == (EXPERTS, IN, 2 * 4) and f.b.shape == (EXPERTS, 2 * 4, OUT) and f.coef.shape == (3, 2 * 4)
    assert torch.equal(f.a[1, :, :4], A[1, 1, :4].T) and torch.equal(f.b[2, 4:], B[2, 2, :4])
    expected = torch.tensor([[1.0, 0.0], [0.25, 0.5], [2.0, 0.0]]).repeat_interleave(4, dim=1)
    assert torch.equal(f.coef, expected)


def test_an_overflowing_expert_adapter_never_reaches_other_rows() -> None:
    """Slot 5's expert factors overflow x @ A to inf; the rows without slot 5 keep exactly their reference delta."""
    A, B = _expert_tables(torch.float32)
    A[5, :, : RANKS[5]] = 1e37
    slots = torch.tensor([[1], [5], [2], [0], [3]])
    weights = torch.ones(5, 1)
    token_rows = torch.tensor([0, 1, 1, 2, 3, 4, 4])
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(11))
    clean = [0, 3, 4, 5, 6]
    fast = lora.expert_lora_delta(x, A, B, slots, weights, CAPACITY, 1, token_rows)
    assert torch.isfinite(fast[clean]).all()
    ref = lora_ref.expert_lora_delta(x[clean], A, B, slots, weights, CAPACITY, 1, token_rows[clean])
    _check(fast[clean], ref, torch.float32)


@pytest.mark.parametrize("pattern", ["identical", "distinct", "with-base-rows"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beside", [None, "bitfit", "dora", "bitfit alone"])
def test_a_wrapped_linear_adds_lora_before_or_after_its_base_product(
    pattern: str, bias: bool, beside: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA's delta is a function of the input alone, and BitFit's of nothing, so the layer computes them first (their
    ``apply`` never runs) and accumulates the base product into their sum; DoRA scales the base output, so its
    ``apply`` runs. Every way, the rows equal the base plus the reference deltas."""
    g = torch.Generator().manual_seed(2)
    A, B, vectors = _tables(torch.float32)
    base = torch.nn.Linear(IN, OUT, bias=bias)
    layer = MultiAdapterLinear(base, BatchPlan(), SLOTS - 1, torch.float32)
    for s in range(1, SLOTS):
        parts: dict[str, object] = {"lora": LoraFactors(A[s, : RANKS[s]], B[s, : RANKS[s]])}
        if beside == "bitfit":
            parts["bias"] = vectors[s]
        elif beside == "bitfit alone":
            parts = {"bias": vectors[s]}
        elif beside == "dora":  # its per-output scale (m / ||W + s B A|| - 1), here any vector
            parts["lora"] = LoraFactors(A[s, : RANKS[s]], B[s, : RANKS[s]], 0.1 * vectors[s])
        layer.set_slot(s, LinearDelta(parts))
    slots = _slots(pattern, 6, 1)
    layer.plan.set([[(int(s), 1.0)] if s else [] for s in slots[:, 0]], torch.device("cpu"))
    applied: list[str] = []
    monkeypatch.setattr(LoraKind, "apply", _recording(LoraKind.apply, applied))
    monkeypatch.setattr(BiasKind, "apply", _recording(BiasKind.apply, applied))
    x = torch.randn(6, 3, IN, generator=g)
    with torch.no_grad():
        fast, plain = layer(x), base(x)
    ref = plain if beside == "bitfit alone" else plain + lora_ref.lora_delta(x, A, B, slots, _weights(6, 1), CAPACITY)
    if beside in ("bitfit", "bitfit alone"):
        ref = ref + vectors[slots[:, 0]][:, None, :]
    elif beside == "dora":
        ref = ref + 0.1 * vectors[slots[:, 0]][:, None, :] * (plain - (base.bias if bias else 0))
    _check(fast, ref, torch.float32)
    assert applied == (["lora"] if beside == "dora" else [])


def _recording(apply: Callable, calls: list[str]) -> Callable:
    def recorded(self: SlotKind, *args: object) -> torch.Tensor:
        calls.append(self.name)
        return apply(self, *args)

    return recorded


def test_layers_of_one_plan_share_the_rows_coefficients() -> None:
    """What the unique path needs of the rows (the batch's distinct adapters, each row's coefficients on them) is
    computed once per plan for every layer at the same rank, and again when the plan changes."""
    A, B, _ = _tables(torch.float32)
    plan = BatchPlan()
    layers = [MultiAdapterLinear(torch.nn.Linear(IN, OUT), plan, SLOTS - 1, torch.float32) for _ in range(3)]
    for layer in layers:
        for s in (1, 2):
            layer.set_slot(s, LinearDelta({"lora": LoraFactors(A[s, :4], B[s, :4])}))
    rows = [[(1, 1.0)], [(2, 1.0)], [(1, 1.0)], [(1, 1.0)], []]
    plan.set(rows, torch.device("cpu"))

    def drops() -> list[torch.Tensor | None]:
        return [layer.batch_states()[0][1][0][1].drop for layer in layers]

    first = drops()
    assert first[0] is not None and all(d is first[0] for d in first)
    plan.set(rows[:4], torch.device("cpu"))
    second = drops()
    assert all(d is second[0] for d in second) and second[0] is not first[0]


def test_a_batch_of_the_same_adapters_reuses_their_gathered_factors() -> None:
    """Requests joining and leaving a batch of the same distinct adapters change the rows' coefficients, not the
    adapters' factors: a layer keeps the factors it gathered (no copy), and gathers again for other adapters or
    once a slot is rewritten. Every plan's output still matches the reference."""
    A, B, _ = _tables(torch.float32)
    plan = BatchPlan()
    layer = MultiAdapterLinear(torch.nn.Linear(IN, OUT), plan, SLOTS - 1, torch.float32)
    for s in (1, 2, 3):
        layer.set_slot(s, LinearDelta({"lora": LoraFactors(A[s, :4], B[s, :4])}))
    x = torch.randn(6, 2, IN)

    def factors(rows: list[list[tuple[int, float]]]) -> torch.Tensor:
        plan.set(rows, torch.device("cpu"))
        slots = torch.tensor([[r[0][0] if r else 0] for r in rows])
        weights = torch.tensor([[r[0][1] if r else 0.0] for r in rows])
        want = layer.base(x[: len(rows)]) + lora_ref.lora_delta(x[: len(rows)], A[:, :4], B[:, :4], slots, weights, 4)
        _check(layer(x[: len(rows)]), want, torch.float32)
        return layer.batch_states()[0][1][0][1].a_t

    two = [[(1, 1.0)], [(2, 1.0)], [(1, 1.0)], [(1, 1.0)], [], [(2, 1.0)]]
    first = factors(two)
    assert factors(two[:4]).data_ptr() == first.data_ptr()  # a request left: the same two adapters
    assert factors(two[1:]).data_ptr() == first.data_ptr()
    other = factors([[(1, 1.0)], [(3, 1.0)], [(1, 1.0)], [(1, 1.0)]])
    assert other.data_ptr() != first.data_ptr()
    layer.set_slot(3, LinearDelta({"lora": LoraFactors(A[4, :4], B[4, :4])}))
    A[3], B[3] = A[4], B[4]  # the reference's slot 3 as rewritten
    rewritten = factors([[(1, 1.0)], [(3, 1.0)], [(1, 1.0)], [(1, 1.0)]])
    assert rewritten.data_ptr() != other.data_ptr()


@pytest.mark.parametrize("k", [1, 2])
def test_a_new_plan_copies_only_the_rows_that_changed(k: int) -> None:
    """Per-row path (distinct adapters): a decode plan that differs from the last one of its shape in a row (a request
    ended, the next took its row), even with a prefill's plan between them, updates that row of the same factors in
    place; every plan's output matches the reference, and after a slot is rewritten its rows are gathered anew."""
    A, B, _ = _tables(torch.float32)
    plan = BatchPlan()
    layer = MultiAdapterLinear(torch.nn.Linear(IN, OUT), plan, SLOTS - 1, torch.float32)
    for s in range(1, SLOTS):
        layer.set_slot(s, LinearDelta({"lora": LoraFactors(A[s, :4], B[s, :4])}))
    x = torch.randn(4, 2, IN)

    def factors(rows: list[list[tuple[int, float]]]) -> torch.Tensor:
        plan.set(rows, torch.device("cpu"))
        n = len(rows)
        slots = torch.tensor([[s for s, _ in r] + [0] * (k - len(r)) for r in rows])
        weights = torch.tensor([[w for _, w in r] + [0.0] * (k - len(r)) for r in rows])
        want = layer.base(x[:n]) + lora_ref.lora_delta(x[:n], A[:, :4], B[:, :4], slots, weights, 4)
        _check(layer(x[:n]), want, torch.float32)
        (path, a_rows, _), _ = layer.batch_states()[0][1]
        assert path == "rows"
        return a_rows

    def row(s: int) -> list[tuple[int, float]]:
        return [(s, 1.0)] if k == 1 else [(s, 0.5), (s % (SLOTS - 1) + 1, 0.25)]

    decode = [row(1), row(2), row(3), row(4)]
    first = factors(decode)
    factors([row(5), row(6)])  # a prefill's plan between two decode plans
    decode[2] = row(6)  # the request in row 2 ended; the next one took its row
    assert factors(decode).data_ptr() == first.data_ptr()
    layer.set_slot(6, LinearDelta({"lora": LoraFactors(A[7, :4], B[7, :4])}))
    A[6], B[6] = A[7], B[7]  # the reference's slot 6 as rewritten
    assert factors(decode).data_ptr() != first.data_ptr()
