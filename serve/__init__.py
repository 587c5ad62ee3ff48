"""hotswap.serve: one frozen base model, many adapters applied unmerged per row (see README, "The serving engine")."""

from __future__ import annotations

from hotswap.serve.config import EngineConfig
from hotswap.serve.engine import Engine, RequestHandle
from hotswap.serve.types import EngineObserver, FinishReason, Request, Result, Timings

__all__ = ["Engine", "EngineConfig", "EngineObserver", "FinishReason", "Request", "RequestHandle", "Result", "Timings"]
