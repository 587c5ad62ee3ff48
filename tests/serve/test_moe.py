"""LoRA on a mixture-of-experts layer's experts, served unmerged per row: the routed experts loop against its
token-by-token reference and against transformers' own experts forward, the wrapped experts against per-row merged
weights, and an engine on tiny Qwen3-MoE with expert adapters of mixed ranks, weighted sets, PEFT's rank and alpha
patterns, attention-only LoRA and base rows in one batch (against PEFT, or the merged delta where PEFT cannot
compose), the static and compiled decodes, and hot unload / reload."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch import nn

from hotswap.basemodel import build_model, fingerprint, load_model, save_model
from hotswap.methods.api import BatchPlan, LinearDelta, decoder_experts, expert_projections
from hotswap.methods.lora.kind import ExpertLoraFactors, ExpertLoraKind
from hotswap.methods.lora.ops import ExpertRows
from hotswap.registry import Registry
from hotswap.serve import Engine, Request
from hotswap.serve.model.layers import MultiAdapterExperts, routed_experts, routed_experts_ref
from hotswap.train import RandomLoraConfig, random_lora
from tests.serve.conftest import _peft_lora
from tests.serve.reference import TEST_DEVICE, peft_model, reference_greedy, reference_logits

MOE = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-olmoe", "tiny-gpt-oss"]
PEFT = "base_model.model."


# -- the routed experts on one layer --------------------------------------------------------------------------
def _experts(preset: str) -> nn.Module:
    """Layer 0's experts of a tiny MoE preset (transformers' stacked expert weights)."""
    return next(iter(decoder_experts(build_model(preset, seed=0, initializer_range=0.1)).values()))


def _width(experts: nn.Module) -> int:
    """The experts' hidden size: the input width of their first projection."""
    return next(iter(expert_projections(experts).values()))[0]


def _routing(tokens: int, experts: int, k: int, idle: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k_index (N, k) of distinct experts per token, top_k_weights (N, k); ``idle``: the last expert gets none."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    if idle:
        logits[:, -1] = -float("inf")
    weights, index = torch.topk(logits.softmax(-1), k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def _factors(experts: nn.Module, rank: int, projections: list[str], seed: int) -> ExpertLoraFactors:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for proj in projections:
        n_in, n_out = expert_projections(experts)[proj]
        a = torch.randn(experts.num_experts, rank, n_in, generator=g) * 0.3
        factors[proj] = (a, torch.randn(experts.num_experts, rank, n_out, generator=g) * 0.3)
    return ExpertLoraFactors(factors)


def _merged(experts: nn.Module, parts: list[tuple[ExpertLoraFactors, float]]) -> nn.Module:
    """A copy of ``experts`` with sum_i w_i * B_e^T A_e added to each expert's weight, in the experts' own layout."""
    out = copy.deepcopy(experts)
    with torch.no_grad():
        for factors, w in parts:
            for proj, (a, b) in factors.factors.items():  # a (E, r, in), b (E, r, out)
                delta = torch.einsum("ero,eri->eoi", b, a)  # (E, out, in)
                getattr(out, proj).add_(w * (delta.transpose(1, 2) if experts.is_transposed else delta))
    return out


ROWS = [[(1, 1.0)], [(2, 1.0)], [], [(1, 0.5), (2, 1.0)], [(2, -1.0), (3, 1.0)]]  # (slot, weight) per row
T = 5  # tokens per row


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-gpt-oss"], ids=["stacked", "transposed-biased"])
def layer(request: pytest.FixtureRequest) -> tuple[nn.Module, dict[int, ExpertLoraFactors]]:
    """One layer's experts and three adapters' factors: both projections at rank 2, down_proj only at rank 3, and
    gate_up_proj only at rank 4."""
    experts = _experts(request.param)
    return experts, {
        1: _factors(experts, 2, ["gate_up_proj", "down_proj"], seed=1),
        2: _factors(experts, 3, ["down_proj"], seed=2),
        3: _factors(experts, 4, ["gate_up_proj"], seed=3),
    }


@pytest.mark.parametrize("idle", [False, True], ids=["all-experts", "an-idle-expert"])
def test_routed_experts_match_the_token_loop(layer: tuple[nn.Module, dict], idle: bool) -> None:
    """routed_experts (each expert once, on its sorted tokens) equals routed_experts_ref with a real ExpertLoraKind
    state: three adapters of mixed ranks and projections in slots, rows using one, none, or a weighted two."""
    experts, adapters = layer
    kind = ExpertLoraKind(experts, num_slots=4, dtype=torch.float32)
    for slot, factors in adapters.items():
        kind.set(slot, factors)
    plan = BatchPlan()
    plan.set(ROWS, torch.device("cpu"))
    state = kind.gather(plan, sorted(plan.used))
    n = len(ROWS) * T
    token_rows = torch.arange(n) // T
    hidden = torch.randn(n, _width(experts), generator=torch.Generator().manual_seed(4))
    index, weights = _routing(n, experts.num_experts, 2, idle, seed=5)

    def deltas(
        proj: str, x: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor, counts: list[int]
    ) -> torch.Tensor | None:
        return kind.delta(proj, x, token_rows[tokens], experts, counts, state)

    with torch.no_grad():
        fast = routed_experts(experts, hidden, index, weights, deltas)
        ref = routed_experts_ref(experts, hidden, index, weights, deltas)
        base = routed_experts(experts, hidden, index, weights, lambda *a: None)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    moved = (fast - base).abs().amax(-1).view(len(ROWS), T).amax(-1)
    assert moved[2] == 0 and (moved[[0, 1, 3, 4]] > 1e-2).all(), "only rows with adapters move"


def test_wrapped_experts_equal_per_row_merged_weights(layer: tuple[nn.Module, dict]) -> None:
    """MultiAdapterExperts on a batch of rows, each with its own (weighted) adapters, equals transformers' own experts
    forward on that row's tokens with the adapters' deltas merged into a copy of the stacked weights (the biases and
    gpt-oss's transposed, interleaved gate/up layout kept)."""
    experts, adapters = layer
    plan = BatchPlan()
    wrapped = MultiAdapterExperts(experts, plan, num_slots=4, dtype=torch.float32)
    for slot, factors in adapters.items():
        wrapped.set_slot(slot, LinearDelta({ExpertLoraKind.name: factors}))
    plan.set(ROWS, torch.device("cpu"))
    n = len(ROWS) * T
    hidden = torch.randn(n, _width(experts), generator=torch.Generator().manual_seed(6))
    index, weights = _routing(n, experts.num_experts, 2, False, seed=7)
    with torch.no_grad():
        out = wrapped(hidden, index, weights)
        for b, row in enumerate(ROWS):
            part = slice(b * T, (b + 1) * T)
            merged = _merged(experts, [(adapters[s], w) for s, w in row])
            ref = merged(hidden[part], index[part], weights[part])
            torch.testing.assert_close(out[part], ref, rtol=1e-5, atol=1e-5, msg=f"row {b}")
        plan.set([[] for _ in ROWS], torch.device("cpu"))  # no adapter in the batch: the family's own forward
        assert torch.equal(wrapped(hidden, index, weights), experts(hidden, index, weights))


@pytest.mark.parametrize("preset", MOE)
def test_routed_experts_without_deltas_equal_the_family_forward(preset: str) -> None:
    experts = _experts(preset)
    hidden = torch.randn(11, _width(experts), generator=torch.Generator().manual_seed(8))
    index, weights = _routing(11, experts.num_experts, 2, False, seed=9)
    with torch.no_grad():
        ours = routed_experts(experts, hidden, index, weights, lambda *a: None)
        torch.testing.assert_close(ours, experts(hidden, index, weights), rtol=1e-5, atol=1e-6)


# -- an engine on tiny Qwen3-MoE ------------------------------------------------------------------------------
def _peft_expert_lora(base: Path, out: Path, seed: int) -> Path:
    """An expert LoRA made by PEFT itself, with a rank and an alpha pattern on the expert projections and rsLoRA."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"], use_rslora=True,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 2})  # fmt: skip
    with warnings.catch_warnings():  # PEFT 0.21 warns the patterns matched no module, and applies them to parameters
        warnings.filterwarnings("ignore", "The following (rank|alpha)_pattern keys", RuntimeWarning)
        _peft_lora(base, out, config, seed)
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes[f"{PEFT}model.layers.0.mlp.experts.lora_A.weight"] == (4 * 2, 32)  # down_proj at rank 2
    assert shapes[f"{PEFT}model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (4 * 4, 64)  # gate_up_proj at 4
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    """(base, registry, adapter name -> artifact) on tiny Qwen3-MoE: expert LoRAs of ranks 2 and 4 (beside attention
    LoRA), PEFT's own expert LoRA with rank and alpha patterns, and an attention-only LoRA."""
    d = tmp_path_factory.mktemp("moe")
    base = save_model(build_model("tiny-qwen3-moe", seed=0, initializer_range=0.1), d / "base")
    experts = ("experts",)
    adapters = {
        "e2": random_lora(
            base,
            d / "e2",
            RandomLoraConfig(rank=2, seed=1, init_std=0.2, target_modules=("o_proj",), target_parameters=experts),
        ),
        "e4": random_lora(
            base,
            d / "e4",
            RandomLoraConfig(
                rank=4, seed=2, init_std=0.2, target_modules=("q_proj", "v_proj"), target_parameters=experts
            ),
        ),
        "pattern": _peft_expert_lora(base, d / "pattern", seed=3),
        "attn": random_lora(
            base,
            d / "attn",
            RandomLoraConfig(rank=4, seed=4, init_std=0.2, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        ),
    }
    registry = Registry(d / "registry")
    for name, path in adapters.items():
        registry.publish(path, name, base_fingerprint=fingerprint(base))
    return base, d / "registry", adapters


def _merged_model(base: Path, parts: list[tuple[Path, float]]) -> nn.Module:
    """The base with sum_i w_i * (alpha / r) * B A of each LoRA artifact merged into its weights, read by hand from
    PEFT's files: a linear's B (out, r) A (r, in); an experts' lora_A (E*r, in), its rows expert by expert, and lora_B
    (out, r*E), its columns rank component by component (each nested projection found by its input width)."""
    model = load_model(base)
    with torch.no_grad():
        for adapter, w in parts:
            config = json.loads((adapter / "adapter_config.json").read_text())
            assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
            r, scale = config["r"], config["lora_alpha"] / config["r"]
            tensors = {k.removeprefix(PEFT): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
            for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
                module = key.removesuffix(".lora_A.weight")
                a, b = tensors[key], tensors[f"{module}.lora_B.weight"]
                if ".mlp.experts" not in module:
                    model.get_submodule(module).weight += w * scale * (b @ a)
                    continue
                experts = model.get_submodule(module.split(".base_layer")[0])
                (proj,) = [p for p, (n_in, _) in expert_projections(experts).items() if n_in == a.shape[1]]
                n = experts.num_experts
                delta = torch.einsum("ore,eri->eoi", b.view(b.shape[0], r, n), a.view(n, r, a.shape[1]))
                assert not experts.is_transposed  # Qwen3-MoE: (E, out, in)
                getattr(experts, proj).add_(w * scale * delta)
    return model.eval()


PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([5, 9, 7, 4, 6, 8, 3])]
ADAPTERS: list[list] = [["e2"], ["e4"], [("e2", 0.5), ("e4", 1.0)], [], ["attn"], ["pattern"], [("e4", -0.7), "attn"]]
NEW = 5


def _requests() -> list[Request]:
    return [Request(prompt_ids=p, adapters=a, max_new_tokens=NEW, ignore_eos=True)
            for p, a in zip(PROMPTS, ADAPTERS, strict=True)]  # fmt: skip


def _reference(base: Path, adapters: dict[str, Path], row: list) -> nn.Module:
    """PEFT's model for a single adapter at weight 1, the base for none, the merged weights for a weighted set."""
    if not row:
        return load_model(base).eval()
    if len(row) == 1 and isinstance(row[0], str):
        return peft_model(base, adapters[row[0]])
    parts = [(x, 1.0) if isinstance(x, str) else x for x in row]
    return _merged_model(base, [(adapters[name], w) for name, w in parts])


@pytest.fixture(scope="module")
def eager(moe: tuple[Path, Path, dict[str, Path]]) -> Iterator[tuple[list[torch.Tensor], list[list[int]]]]:
    """The mixed batch's prompt logits and greedy tokens, eager decode."""
    base, registry, _ = moe
    with Engine(base, registry, max_batch=8, max_resident=4, max_seq_len=16, dtype="float32",
                device=TEST_DEVICE) as engine:  # fmt: skip
        logits = [x.cpu() for x in engine.forward_logits(_requests())]
        yield logits, [r.token_ids for r in engine.generate(_requests())]


def test_rows_of_distinct_expert_adapters_read_their_own_factors(
    moe: tuple[Path, Path, dict[str, Path]], eager: tuple[list[torch.Tensor], list[list[int]]]
) -> None:
    """Rows each with its own expert adapter (as many distinct adapters as rows: each routed token reads its own
    factors, ExpertRows) give the mixed batch's logits and tokens (there: the batch's distinct adapters, read once)."""
    base, registry, _ = moe
    picked = [0, 1, 5, 2]  # e2, e4, pattern, e2 x 0.5 + e4
    requests = [_requests()[i] for i in picked]
    with Engine(base, registry, max_batch=8, max_resident=4, max_seq_len=16, dtype="float32",
                device=TEST_DEVICE) as engine:  # fmt: skip
        logits = [x.cpu() for x in engine.forward_logits(requests)]
        states = [s for m in engine.model.modules() if isinstance(m, MultiAdapterExperts) for _, s in m.batch_states()]
        assert states and all(isinstance(f, ExpertRows) for s in states for f in s.values())
        tokens = [r.token_ids for r in engine.generate(requests)]
    for i, row in enumerate(picked):
        _assert_close(logits[i], eager[0][row])
        assert tokens[i] == eager[1][row]


def test_merged_reference_is_peft_for_one_adapter(moe: tuple[Path, Path, dict[str, Path]]) -> None:
    """The test's own premise: the hand-merged weights of one expert LoRA at weight 1 give PEFT's logits."""
    base, _, adapters = moe
    ids = PROMPTS[0]
    ref = reference_logits(peft_model(base, adapters["e4"]), ids)
    merged = reference_logits(_merged_model(base, [(adapters["e4"], 1.0)]), ids)
    assert (ref - reference_logits(load_model(base), ids)).abs().max() > 1e-2
    assert (merged - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("row", range(len(ADAPTERS)), ids=["e2", "e4", "e2x.5+e4", "base", "attn", "pattern", "mix"])
def test_mixed_batch_row_matches_its_reference(
    moe: tuple[Path, Path, dict[str, Path]], eager: tuple[list[torch.Tensor], list[list[int]]], row: int
) -> None:
    """Every row of one batch (expert LoRAs of ranks 2 and 4, a weighted pair, a negative weight beside attention
    LoRA, PEFT's rank / alpha patterns with rsLoRA, attention-only, base): logits and greedy tokens of its reference."""
    base, _, adapters = moe
    model = _reference(base, adapters, ADAPTERS[row])
    ref = reference_logits(model, PROMPTS[row])
    logits, tokens = eager
    assert (logits[row] - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert tokens[row] == reference_greedy(model, PROMPTS[row], NEW)


def _compiled_engine(base: Path, registry: Path) -> Engine:
    """decode="compile" with dynamo's eager backend (the same fullgraph trace, no inductor build on the CPU)."""
    engine = Engine(base, registry, max_batch=8, max_resident=4, max_seq_len=16, prefix_cache=False,
                    decode="compile", dtype="float32", device="cpu")  # fmt: skip
    torch._dynamo.reset()
    static = engine.runner.static
    static._forward = torch.compile(static._step, backend="eager", fullgraph=True, dynamic=False)
    return engine


def test_static_and_compiled_decodes_give_the_eager_tokens(
    moe: tuple[Path, Path, dict[str, Path]], eager: tuple[list[torch.Tensor], list[list[int]]]
) -> None:
    """The mixed batch decodes to the eager tokens under decode="static" and "compile". Compiled, a batch with expert
    adapters decodes eagerly (its experts run on routed tokens: shapes from the data), while a batch of
    attention-only LoRA and base rows is traced whole (fullgraph) and gives the eager tokens too."""
    base, registry, _ = moe
    with Engine(base, registry, max_batch=8, max_resident=4, max_seq_len=16, prefix_cache=False, decode="static",
                dtype="float32", device="cpu") as engine:  # fmt: skip
        assert [r.token_ids for r in engine.generate(_requests())] == eager[1]
    attention_only = [["attn"], [], ["attn"]]
    short = [Request(prompt_ids=[5 + i, 9, 11, 2], adapters=a, max_new_tokens=3, ignore_eos=True)
             for i, a in enumerate(attention_only)]  # fmt: skip
    with Engine(base, registry, max_batch=8, max_resident=4, max_seq_len=16, dtype="float32", device="cpu") as engine:
        short_eager = [r.token_ids for r in engine.generate(short)]
    with _compiled_engine(base, registry) as engine:
        static = engine.runner.static
        assert [r.token_ids for r in engine.generate(_requests())] == eager[1]
        experts = [i for i, layer in enumerate(static.layers) if isinstance(layer, MultiAdapterExperts)]
        assert static.eager_steps > 0, "steps with expert adapters decode eagerly"
        assert all(layouts[i] == () for _, _, layouts in static.steps for i in experts), "none was traced"
        eager_steps = static.eager_steps
        assert [r.token_ids for r in engine.generate(short)] == short_eager
        assert static.eager_steps == eager_steps and static.new_steps > 0, "no expert adapter: traced"


def test_static_decode_runs_expert_adapters_through_the_step(moe: tuple[Path, Path, dict[str, Path]]) -> None:
    """decode="static" (the step run eagerly, no trace) has no data-dependent shape to avoid: expert adapters run
    through it as every other method's do (test_static_decode: eager_steps == 0)."""
    base, registry, _ = moe
    with Engine(base, registry, max_batch=8, max_resident=4, max_seq_len=16, prefix_cache=False, decode="static",
                dtype="float32", device="cpu") as engine:  # fmt: skip
        engine.generate(_requests())
        assert engine.runner.static.eager_steps == 0


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 summation order (other batch companions, another slot): 1e-5 of the logits' range."""
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_hot_unload_and_reload_keep_the_outputs(
    moe: tuple[Path, Path, dict[str, Path]], eager: tuple[list[torch.Tensor], list[list[int]]]
) -> None:
    """Two resident slots: unload e2 while e4 stays (e4's rows unchanged), PEFT's adapter takes e2's slot, then e4
    is unloaded and e2 comes back into e4's old slot (rank 4 there before, 2 now): every row as before."""
    base, registry, _ = moe
    rows = [Request(prompt_ids=PROMPTS[i], adapters=ADAPTERS[i], max_new_tokens=1) for i in (0, 1, 5)]
    with Engine(base, registry, max_batch=4, max_resident=2, max_seq_len=16, dtype="float32", device="cpu") as engine:
        engine.load_adapter("e2")
        engine.load_adapter("e4")
        first = dict(engine.pool.slot_of)
        before = engine.forward_logits(rows[:2])
        assert engine.unload_adapter("e2") == "e2@1" and engine.resident() == ["e4@1"]
        _assert_close(engine.forward_logits([rows[1]])[0], before[1])
        _assert_close(engine.forward_logits([rows[2]])[0], eager[0][5])
        assert engine.pool.slot_of["pattern@1"] == first["e2@1"]
        engine.unload_adapter("e4")
        _assert_close(engine.forward_logits([rows[0]])[0], before[0])
        assert engine.pool.slot_of["e2@1"] == first["e4@1"], "e2 came back in the slot e4 (rank 4) held"
        again = engine.forward_logits(rows[:2])  # e4 back in, evicting PEFT's adapter
        assert sorted(engine.resident()) == ["e2@1", "e4@1"]
        for got, want in zip(again, before, strict=True):
            _assert_close(got, want)


def test_adapter_bytes_count_the_expert_factors(moe: tuple[Path, Path, dict[str, Path]]) -> None:
    """What an expert LoRA holds in memory counts its expert factors (the host cache budget and the adapter's
    reported bytes): at least the artifact's float32 tensors, which it serves at the same sizes."""
    base, registry, adapters = moe
    stored = sum(t.numel() * 4 for t in load_file(adapters["e2"] / "adapter_model.safetensors").values())
    with Engine(base, registry, max_batch=2, max_resident=2, max_seq_len=16, dtype="float32", device="cpu") as engine:
        engine.load_adapter("e2")
        assert engine.adapter_bytes("e2@1") >= stored
