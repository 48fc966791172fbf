"""Shared test settings."""

from __future__ import annotations

import torch

# Tiny models train much faster single-threaded, and the suite runs on 2 cores.
torch.set_num_threads(1)
