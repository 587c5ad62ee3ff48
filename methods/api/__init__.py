"""The contract between adapter methods and the rest of hotswap; it imports neither serve/ nor train/.

A method folder imports only this package (and torch, PEFT, transformers): what a method is
(:class:`MethodSpec`), what its serving loader returns (:class:`LoadedAdapter`: per-linear
:class:`LinearDelta` payloads for slot kinds, engine-wide payloads for context and logit kinds), what it
knows of the base (:class:`BaseInfo`), the checks every loader runs, and the kinds it registers. Shared
writing and training helpers are its submodules: :mod:`.common` (targets, synthetic artifacts),
:mod:`.peft_common` (methods PEFT trains), :mod:`.trainable` (what the trainer asks of a method).
"""

from __future__ import annotations

from hotswap.methods.api.adapter import (
    WEIGHTS,
    BaseInfo,
    LoadedAdapter,
    check_finite,
    check_shape,
    decoder_experts,
    decoder_linears,
    dense_weight,
    expert_projections,
    input_embedding,
    read_json,
    read_tensors,
    read_weights,
    served_linears,
    target_linear,
    target_linears,
)
from hotswap.methods.api.kinds import (
    AdapterKind,
    BatchPlan,
    ContextKind,
    EmbeddingKind,
    EngineRows,
    ExpertKind,
    KVWriter,
    LinearDelta,
    LogitKind,
    LogitRow,
    RowRunner,
    SlotKind,
    SlotTable,
    adapter_kind,
    nbytes,
    register_kind,
    slot_kind,
)
from hotswap.methods.api.rows import weighted_rows
from hotswap.methods.api.spec import MethodSpec, RandomKnobs, peft_method, register, registered

__all__ = [
    "WEIGHTS",
    "AdapterKind",
    "BaseInfo",
    "BatchPlan",
    "ContextKind",
    "EmbeddingKind",
    "EngineRows",
    "ExpertKind",
    "KVWriter",
    "LinearDelta",
    "LoadedAdapter",
    "LogitKind",
    "LogitRow",
    "MethodSpec",
    "RandomKnobs",
    "RowRunner",
    "SlotKind",
    "SlotTable",
    "adapter_kind",
    "check_finite",
    "check_shape",
    "decoder_experts",
    "decoder_linears",
    "dense_weight",
    "expert_projections",
    "input_embedding",
    "nbytes",
    "peft_method",
    "read_json",
    "read_tensors",
    "read_weights",
    "register",
    "register_kind",
    "registered",
    "served_linears",
    "slot_kind",
    "target_linear",
    "target_linears",
    "weighted_rows",
]
