"""The methods scenario's MoE rows (docs/benchmarks.md): on an MoE base (``Workload.moe``), N distinct LoRA adapters
on the attention projections and every expert (PEFT ``target_parameters``), and N on the attention alone, each set
in its own batch (request i uses adapter i mod N), against that base and HF ``generate`` in interleaved rounds."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from typing import Any

from hotswap.bench.common import (
    CHECK_ROWS,
    Fixtures,
    hf_generate,
    interleaved,
    max_logit_diff,
    model_bytes,
    requests,
    roofline,
    roofline_fields,
    set_threads,
    summary,
)

log = logging.getLogger(__name__)
TARGETS = {"attention + experts": True, "attention": False}  # a row's targets -> LoRA on the experts too


def moe_rows(fx: Fixtures, n: int) -> list[dict[str, Any]]:
    """One row per entry of TARGETS: N distinct adapters in a batch of the workload's size on the MoE base, tok/s
    ÷ the base's in the same rounds; each row also carries the base ÷ HF ``generate`` and the max |logit
    difference| against PEFT (its ``target_parameters`` LoRA) on the first rows."""
    w = fx.workload
    moe = Fixtures(replace(w, model=w.moe), fx.cache)
    prompts = moe.prompts(w.batch)
    names = {label: moe.moe_loras(n, experts) for label, experts in TARGETS.items()}
    batches = {label: [adapters[i % n] for i in range(w.batch)] for label, adapters in names.items()}
    with moe.engine(max_batch=w.batch, max_resident=n * len(TARGETS)) as engine:
        refs = {name: engine.load_adapter(name) for adapters in names.values() for name in adapters}
        hf_model = moe.load_base()
        runs = {
            "base": partial(engine.generate, requests(prompts, [[] for _ in prompts], w.new_tokens)),
            "hf": partial(hf_generate, hf_model, prompts, w.new_tokens),
        }
        for label, rows in batches.items():
            runs[label] = partial(engine.generate, requests(prompts, [[a] for a in rows], w.new_tokens))
        set_threads()
        rounds = interleaved(runs, w.repeats)
        diffs = {
            label: max_logit_diff(engine, moe.peft(names[label][:CHECK_ROWS]), prompts[:CHECK_ROWS], rows[:CHECK_ROWS])
            for label, rows in batches.items()
        }
        base_bytes = model_bytes(engine.model)
        bounds = {label: roofline(base_bytes, sum(engine.adapter_bytes(refs[a]) for a in set(rows)))
                  for label, rows in batches.items()}  # fmt: skip
    tokens = w.batch * w.new_tokens
    out = []
    for label in batches:
        vs_base = rounds.vs("base", label, "base")
        row = {
            "label": f"MoE {w.moe}: LoRA on {label}",
            "method": "lora",
            "model": w.moe,
            "targets": label,
            "n_adapters": n,
            "tok_s": rounds.tok_s(label, tokens),
            "base_tok_s": rounds.tok_s("base", tokens),
            **vs_base,
            **roofline_fields(vs_base["vs_base"], bounds[label]),
            "hf_generate_tok_s": rounds.tok_s("hf", tokens),
            **summary("base_vs_hf_generate", rounds.ratios("base", "hf")),
            "max_abs_logit_diff": diffs[label],
        }
        out.append(row)
        log.info("methods, MoE %s: %s", label, row)
    return out
