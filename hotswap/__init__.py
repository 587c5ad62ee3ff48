"""hotswap: an adapter registry and a hot-swap multi-adapter inference server."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hotswap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The quant extra's libraries, imported by PEFT whenever installed, log a warning for each optional kernel they
# cannot load (CUDA-only ones on a CPU, the `kernels` package), and torch one for torchao's pytree registrations: on
# every command, about nothing hotswap uses. Their errors still show.
for _name in ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
