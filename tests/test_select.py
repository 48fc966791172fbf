"""topk_mask: exactly k of the largest, seeded tie-breaking, both code paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynarch import select
from dynarch.select import topk_mask


def _check(x: torch.Tensor, k: int, m: torch.Tensor) -> None:
    assert m.dtype == torch.bool and m.shape == x.shape
    assert int(m.sum()) == max(0, min(k, x.numel()))
    if 0 < k < x.numel():
        assert x[m].min() >= x[~m].max()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    frac=st.floats(0, 1),
    levels=st.integers(1, 50),
    seed=st.integers(0, 2**31 - 1),
)
def test_exactly_k_largest_with_ties(n: int, frac: float, levels: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n,), generator=g).float()  # many ties
    k = round(frac * n)
    _check(x, k, topk_mask(x, k, g))


@pytest.mark.parametrize("k", [1, 7, 5000, 100_000, 199_999])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_large_tensors_use_the_bracket_and_stay_exact(k: int, kind: str) -> None:
    g = torch.Generator().manual_seed(k)
    n = 200_000
    x = {
        "normal": torch.randn(n, generator=g),
        "ties": torch.randint(0, 5, (n,), generator=g).float(),
        "zeros": torch.zeros(n),
    }[kind]
    _check(x, k, topk_mask(x, k, g))


def test_bracket_path_is_taken_and_agrees_with_exact_selection(monkeypatch) -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    calls = []
    real = select._bracketed
    monkeypatch.setattr(select, "_bracketed", lambda *a: calls.append(1) or real(*a))
    m = topk_mask(x, 1234, torch.Generator().manual_seed(1))
    assert calls and torch.equal(m, x >= x.topk(1234).values.min())


def test_ties_are_broken_by_the_generator_reproducibly() -> None:
    x = torch.zeros(1000)
    a = topk_mask(x, 100, torch.Generator().manual_seed(3))
    b = topk_mask(x, 100, torch.Generator().manual_seed(3))
    c = topk_mask(x, 100, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[:500].sum() > 20 and a[500:].sum() > 20  # spread out, not the first 100


def test_shape_is_kept_and_edges() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3)
    assert topk_mask(x, 6, g).shape == (4, 5, 3)
    assert topk_mask(x, 0, g).sum() == 0 and topk_mask(x, 99, g).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_and_topk_indices_agree_with_topk_mask(dtype: torch.dtype) -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2)).to(dtype)
    for k in (1, 999, 50_000):
        m = topk_mask(x, k, torch.Generator().manual_seed(5))
        idx = select.topk_indices(x, k, torch.Generator().manual_seed(5))
        _check(x.float(), k, m)
        assert idx.numel() == k and torch.equal(torch.zeros_like(m).index_fill_(0, idx, True), m)


def test_topk_indices_ranks_nan_lowest() -> None:
    x = torch.arange(70_000.0)
    x[::3] = float("nan")
    idx = select.topk_indices(x, 46_666, torch.Generator().manual_seed(0))
    assert idx.numel() == 46_666 and not bool(x[idx].isnan().any())
    idx = select.topk_indices(x, 50_000, torch.Generator().manual_seed(0))  # some NaN needed
    assert idx.numel() == 50_000 and idx.unique().numel() == 50_000
