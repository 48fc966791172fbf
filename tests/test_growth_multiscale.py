"""Multi-scale bootstrapping: pooling, hierarchical and decisive-feature initialisation."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

import dynarch
from dynarch.checkpoint import load, save
from dynarch.growth.multiscale import (
    MultiScale,
    MultiScaleResult,
    decisive_init,
    downsample,
    hierarchical_init,
    upsample,
)
from dynarch.masks import layer_density
from dynarch.models import mlp


def _pair(small_hidden: list[int], large_hidden: list[int], c: int = 2) -> tuple[nn.Module, ...]:
    torch.manual_seed(0)
    return mlp(c * 4 * 4, small_hidden, 3), mlp(c * 8 * 8, large_hidden, 3)


def test_downsample_and_upsample_values() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert downsample(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert downsample(x, 4) is x
    assert downsample(x, 1).item() == 7.5
    up = upsample(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), 4)
    assert up[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert torch.equal(downsample(up, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))


def test_pooling_errors() -> None:
    with pytest.raises(ValueError, match=r"size must be a positive int dividing the image size"):
        downsample(torch.zeros(1, 1, 4, 4), 3)
    with pytest.raises(ValueError, match=r"x must be images of shape \(N, C, H, W\), got \(4, 4\)"):
        downsample(torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match=r"size must be a multiple of the square image side 2"):
        upsample(torch.zeros(1, 1, 2, 2), 3)


@pytest.mark.parametrize(("small_h", "large_h"), [([5], [5]), ([5, 4], [7, 6])])
def test_hierarchical_large_net_equals_small_net_on_pooled_inputs(
    small_h: list[int], large_h: list[int]
) -> None:
    small, large = _pair(small_h, large_h)
    hierarchical_init(small, large, (2, 4, 4), (2, 8, 8))
    xs = torch.randn(10, 2, 4, 4)
    # next-scale output on an upsampled-equivalent input equals the small net's output
    torch.testing.assert_close(large(upsample(xs, 8)), small(xs), rtol=0, atol=1e-5)
    # ... and on any input it equals the small net on the average-pooled input
    x = torch.randn(10, 2, 8, 8)
    torch.testing.assert_close(large(x), small(downsample(x, 4)), rtol=0, atol=1e-5)


def test_hierarchical_weights_are_upsampled_and_scaled() -> None:
    small, large = _pair([5], [7])
    hierarchical_init(small, large, (2, 4, 4), (2, 8, 8))
    w = large.fc1.weight[:5].view(5, 2, 8, 8)
    assert torch.equal(w[:, :, 2:4, 6:8], small.fc1.weight.view(5, 2, 4, 4)[:, :, 1:2, 3:4]
                       .expand(5, 2, 2, 2) / 4)  # fmt: skip
    assert torch.equal(large.out.weight[:, :5], small.out.weight)
    assert bool((large.out.weight[:, 5:] == 0).all())


def test_decisive_masks_children_of_top_k_features_and_equals_pruned_small_net() -> None:
    small, large = _pair([5], [7])
    decisive_init(small, large, (2, 4, 4), (2, 8, 8), top_k=3)
    mask = large.fc1.weight_mask
    assert mask.sum(1).tolist() == [12] * 7  # 3 features x 4 children each
    pruned = mlp(32, [5], 3)
    pruned.load_state_dict(small.state_dict())
    with torch.no_grad():
        keep = torch.zeros_like(small.fc1.weight, dtype=torch.bool)
        keep.scatter_(1, small.fc1.weight.abs().topk(3, dim=1).indices, True)
        pruned.fc1.weight.mul_(keep)
    x = torch.randn(6, 2, 8, 8)
    torch.testing.assert_close(large(x), pruned(downsample(x, 4)), rtol=0, atol=1e-5)
    # the extra units read the 3 features with the largest total |weight|
    top = small.fc1.weight.abs().sum(0).topk(3).indices
    parents = torch.zeros(32, dtype=torch.bool)
    parents[top] = True
    expected = parents.view(2, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2).flatten()
    assert torch.equal(mask[5], expected) and torch.equal(mask[6], expected)
    event = dynarch.history(large)[-1]
    assert (event.op, event.details["top_k"], event.details["fc1"]["active"]) == ("sparsify", 3, 84)


def test_decisive_model_checkpoint_round_trip() -> None:
    small, large = _pair([5], [5])
    decisive_init(small, large, (2, 4, 4), (2, 8, 8), top_k=2)
    x = torch.randn(4, 2, 8, 8)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load(save(tmp + "/ckpt", large))
    assert torch.equal(ckpt.model(x), large(x))
    assert layer_density(ckpt.model) == layer_density(large)


def test_init_errors() -> None:
    small, large = _pair([5], [5])
    with pytest.raises(ValueError, match=r"must be the small shape \(2, 4, 4\) scaled by one"):
        hierarchical_init(small, large, (2, 4, 4), (2, 8, 6))
    with pytest.raises(ValueError, match=r"same C, got \(1, 4, 4\) and \(2, 8, 8\)"):
        hierarchical_init(small, large, (1, 4, 4), (2, 8, 8))
    with pytest.raises(ValueError, match=r"same number of Linear layers"):
        hierarchical_init(small, mlp(128, [5, 5], 3), (2, 4, 4), (2, 8, 8))
    with pytest.raises(ValueError, match=r"large layer 'fc1' \(4 units\) must be at least as wide"):
        hierarchical_init(small, mlp(128, [4], 3), (2, 4, 4), (2, 8, 8))
    with pytest.raises(ValueError, match=r"same number of outputs"):
        hierarchical_init(small, mlp(128, [5], 4), (2, 4, 4), (2, 8, 8))
    with pytest.raises(ValueError, match=r"first layers 'fc1'/'fc1' take 32/128 inputs, expected"):
        hierarchical_init(small, large, (2, 4, 4), (2, 16, 16))
    with pytest.raises(ValueError, match=r"has a BatchNorm1d \('bn1'\) with parameters"):
        hierarchical_init(small, mlp(128, [5], 3, batchnorm=True), (2, 4, 4), (2, 8, 8))
    with pytest.raises(ValueError, match=r"top_k must be at most the 32 small-scale inputs"):
        decisive_init(small, large, (2, 4, 4), (2, 8, 8), top_k=33)


def _images(n: int = 256) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[:, :, :4] += y.view(n, 1, 1, 1).float()  # class 1: bright top half
    return (x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])


@pytest.mark.parametrize("init", ["hierarchical", "decisive"])
def test_multiscale_run_starts_each_scale_where_the_last_ended(init: str) -> None:
    ms = MultiScale([2, 4, 8], lambda s: mlp(s * s, [6], 2), init=init, top_k=4,
                    epochs_per_scale=[4, 1, 1], lr=5e-2, batch_size=16)  # fmt: skip
    result = ms.run(_images())
    assert [(r["scale"], r["init"], r["epochs"]) for r in result.rows] == [
        (2, "none", 4), (4, init, 1), (8, init, 1),
    ]  # fmt: skip
    for prev, row in zip(result.rows, result.rows[1:]):
        if init == "hierarchical":  # the same function: the same accuracy
            assert row["accuracy_at_init"] == prev["accuracy"]
        else:  # the first layer pruned to 4 features per unit: still far above chance
            assert row["accuracy_at_init"] > 0.8
    assert result.model.fc1.in_features == 64
    assert result.rows[0]["accuracy"] > 0.9


def test_multiscale_none_is_independent_and_table() -> None:
    result = MultiScale([4, 8], lambda s: mlp(s * s, [4], 2), init="none").run(_images())
    assert [r["init"] for r in result.rows] == ["none", "none"]
    lines = result.table().splitlines()
    assert lines[:2] == [
        "| scale | init | params | accuracy at init | accuracy | epochs | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    assert lines[2].startswith("| 4 | none | 78 | ") and lines[3].startswith("| 8 | none | 270 | ")
    assert MultiScaleResult(nn.Identity()).rows == []


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([4, 6], None), {}, ValueError, r"each dividing the next, got \[4, 6\] \(4 -> 6\)"),
        ((8, None), {}, ValueError, r"scales must be a non-empty list of image sides, got 8"),
        (([4, 8], None), {"init": "copy"}, ValueError, r"unknown init 'copy'; allowed: hierarch"),
        (([4, 8], 3), {}, TypeError, r"build must be callable"),
        (([4, 8], None), {"epochs_per_scale": [1]}, ValueError, r"1 entries for 2 scales"),
        (([4, 8], None), {"top_k": 0}, ValueError, r"top_k must be an int >= 1, got 0"),
    ],
)
def test_multiscale_bad_arguments(args: tuple, kwargs: dict, error: type, match: str) -> None:
    scales, build = args
    with pytest.raises(error, match=match):
        MultiScale(scales, build or (lambda s: mlp(s * s, [4], 2)), **kwargs)


def test_multiscale_bad_data() -> None:
    ms = MultiScale([3], lambda s: mlp(s * s, [4], 2))
    with pytest.raises(ValueError, match=r"the largest scale 3 must divide the images' 8"):
        ms.run(_images())
    with pytest.raises(TypeError, match=r"data must be a dynarch.data.Dataset"):
        ms.run(torch.zeros(3))
    with pytest.raises(TypeError, match=r"build\(3\) returned int, not an nn.Module"):
        MultiScale([3], lambda s: 3).run(((torch.zeros(2, 1, 3, 3), torch.zeros(2)),) * 2)
