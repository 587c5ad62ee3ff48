"""``python -m hotswap``: the ``hotswap`` command, for launchers that start a module (``torchrun -m hotswap train``,
``accelerate launch -m hotswap train``)."""

from __future__ import annotations

import sys

from hotswap.cli import main

sys.exit(main())
