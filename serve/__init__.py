"""hotswap.serve: one frozen base model, many adapters applied unmerged per row (docs/serving.md)."""

from __future__ import annotations

from hotswap.serve.engine.config import EngineConfig
from hotswap.serve.engine.engine import Engine, RequestHandle
from hotswap.serve.engine.types import EngineObserver, FinishReason, Request, Result, Timings

__all__ = ["Engine", "EngineConfig", "EngineObserver", "FinishReason", "Request", "RequestHandle", "Result", "Timings"]
