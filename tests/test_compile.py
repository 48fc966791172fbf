"""torch.compile: a mask update keeps the compiled graph; a growth op recompiles once."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import dynarch
from dynarch.masks import sparsify


def test_mask_update_keeps_graph_and_growth_recompiles_once() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsify(model, 0.5)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(8, 16)
    compiled(x)
    assert counter.frame_count == 1
    mask = model[0].weight_mask
    sparsify(model, 0.3)  # masks updated in place (lower density)
    assert model[0].weight_mask is mask
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 1  # no recompilation through a mask update
    dynarch.widen(model, "0", 48)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 2  # recompiled once after the growth op
    compiled(x)
    assert counter.frame_count == 2
    torch._dynamo.reset()
