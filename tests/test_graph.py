"""dynarch.graph: channel groups, coupling, problems, name resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynarch
from dynarch.graph import ChannelGroup, UnsupportedModelError, analyse, resolve
from models import (
    CatModel,
    DataDependent,
    Twice,
    cnn,
    custom_mlp,
    functional_cnn,
    layernorm_mlp,
    mlp,
    resnet,
    variants,
)

OUTPUT = "its output is an output of the model (resizing it would change the output shape)"


def _groups(model: nn.Module) -> list[tuple[list[str], list[tuple[str, bool]], list[str]]]:
    return [(g.producers, g.consumers, g.norms) for g in analyse(model).groups]


def test_mlp_groups() -> None:
    graph = analyse(mlp())
    assert _groups(mlp()) == [
        (["0"], [("2", False)], []),
        (["2"], [("4", False)], []),
        (["4"], [], []),
    ]
    assert graph.group_of == {"0": 0, "2": 1, "4": 2}
    assert [g.problems for g in graph.groups] == [[], [], [OUTPUT]]
    assert {k: len(v) for k, v in graph.calls.items()} == {"0": 1, "1": 1, "2": 1, "3": 1, "4": 1}


def test_cnn_groups_batchnorm_and_flatten_block() -> None:
    assert _groups(cnn()) == [
        (["0"], [("4", False)], ["1"]),
        (["4"], [("9", True)], ["5"]),  # Flatten: each channel is a block of columns
        (["9"], [("11", False)], []),
        (["11"], [], []),
    ]
    group = analyse(cnn()).group("4")
    assert group.norm_dims == {"5": 0}
    assert group.layernorm_over_channels == []


def test_resnet_coupled_channels() -> None:
    graph = analyse(resnet())
    coupled = graph.group("stem")
    assert coupled.producers == ["stem", "block1.conv2", "block2.conv2"]
    assert coupled.consumers == [("block1.conv1", False), ("block2.conv1", False), ("fc1", True)]
    assert coupled.norms == ["bn", "block1.bn2", "block2.bn2"]
    assert coupled.problems == []
    assert (
        graph.group_of["stem"] == graph.group_of["block1.conv2"] == graph.group_of["block2.conv2"]
    )
    inner = graph.group("block1.conv1")
    assert (inner.producers, inner.consumers, inner.norms) == (
        ["block1.conv1"],
        [("block1.conv2", False)],
        ["block1.bn1"],
    )


def test_custom_and_functional_models() -> None:
    assert _groups(custom_mlp()) == [(["fc1"], [("fc2", False)], []), (["fc2"], [], [])]
    assert _groups(functional_cnn()) == [
        (["conv"], [("fc1", True)], []),  # torch.relu, F.max_pool2d, x.view(x.size(0), -1)
        (["fc1"], [("fc2", False)], []),
        (["fc2"], [], []),
    ]


def test_variants_flatten_mean_and_coupled_linears() -> None:
    graph = analyse(variants())
    conv2 = graph.group("conv2")
    assert conv2.consumers == [("fc_a", True), ("fc_b", False)]
    assert conv2.norms == ["bn2"]
    assert graph.group("conv1").norms == ["bn1"]
    coupled = graph.group("fc_a")
    assert (coupled.producers, coupled.consumers, coupled.norms) == (
        ["fc_a", "fc_b"], [("head", False)], ["bn3"]
    )  # fmt: skip
    assert all(g.problems == [] for g in graph.groups[:-1])


def test_per_channel_prelu_is_a_problem() -> None:
    shared = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    assert analyse(shared).group("0").problems == []
    per_channel = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2))
    assert analyse(per_channel).group("0").problems == ["PReLU '1' has one parameter per channel"]


def test_layernorm_over_channels_is_recorded() -> None:
    group = analyse(layernorm_mlp()).group("0")
    assert group.norms == ["1"]
    assert group.layernorm_over_channels == ["1"]
    assert group.norm_dims == {"1": 0}
    assert group.problems == []


def test_cat_is_a_problem_only_for_the_spaces_it_touches() -> None:
    graph = analyse(CatModel())
    assert graph.group("fc1").problems == [
        "'cat' in CatModel.forward is not supported on a changed channel space"
    ]
    assert graph.group("fc2").problems == [
        "'cat' in CatModel.forward is not supported on a changed channel space"
    ]
    assert graph.group("head").problems == [OUTPUT]


def test_layer_reused_on_different_inputs_is_a_problem() -> None:
    graph = analyse(Twice())
    assert len(graph.calls["fc"]) == 2
    group = graph.group("fc")
    assert group.producers == ["fc"]
    assert group.consumers == [("fc", False), ("head", False)]
    assert group.problems == ["'fc' is called 2 times on inputs of different channel spaces"]


def test_untraceable_model() -> None:
    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot trace DataDependent with torch\.fx \(TraceError: .*\); dynarch needs a "
        r"forward without data-dependent control flow",
    ):
        analyse(DataDependent())


def test_group_of_a_module_that_is_not_a_layer() -> None:
    with pytest.raises(
        UnsupportedModelError, match=r"^'1' is not a Linear or Conv2d called in forward$"
    ):
        analyse(mlp()).group("1")


def test_unsupported_module_and_flatten() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.up = nn.Upsample(scale_factor=2)
            self.conv2 = nn.Conv2d(2, 3, 1)
            self.flat = nn.Flatten(0)
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(self.conv(x)).sum() + self.flat(self.conv2(x)).sum()

    graph = analyse(Odd())
    assert graph.group("conv").problems == ["module 'up' (Upsample) is not supported"]
    assert graph.group("conv2").problems == ["Flatten 'flat' (start_dim=0) is not supported"]


def test_scalar_ops_pass_and_binary_ops_couple() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(3, 4)
            self.out = nn.Linear(4, 2)
            self.register_buffer("gain", torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out((self.a(x) * self.gain - 1.0) * self.b(x))

    group = analyse(Scaled()).group("a")
    assert group.producers == ["a", "b"]
    assert group.consumers == [("out", False)]
    assert group.problems == []


def test_resolve() -> None:
    model = custom_mlp()
    assert resolve(model, "fc1") is model.fc1
    assert resolve(model, "act", (nn.ReLU,)) is model.act
    with pytest.raises(
        KeyError, match=r"model has no submodule named 'fc'; did you mean one of \['fc1', 'fc2'\]\?"
    ):
        resolve(model, "fc")
    with pytest.raises(
        KeyError, match=r"no submodule named 'fc3'; did you mean one of \['fc1', 'fc2'\]\?"
    ):
        resolve(model, "fc3")  # a typo: close matches are suggested
    with pytest.raises(KeyError, match=r"model has no submodule named 'zzz'\"?$"):
        resolve(model, "zzz")  # nothing close: no suggestion
    with pytest.raises(KeyError, match=r"model has no submodule named ''"):
        resolve(model, "")
    with pytest.raises(TypeError, match=r"^'act' is a ReLU; expected one of: Linear, Conv2d$"):
        resolve(model, "act", (nn.Linear, nn.Conv2d))


def test_channel_group_defaults_are_independent() -> None:
    a, b = ChannelGroup(), ChannelGroup()
    a.producers.append("x")
    assert b.producers == []


def test_a_linear_over_a_feature_maps_last_axis_is_not_a_channel_consumer() -> None:
    class WidthMixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.lin = nn.Linear(8, 8)  # acts on the width axis (W = 8 = channels)
            self.head = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.flatten(torch.relu(self.lin(self.conv(x))), 1))

    model = WidthMixer()
    group = analyse(model).group("conv")
    assert group.problems == ["Linear 'lin' reads the last axis of a feature map, not its channels"]
    with pytest.raises(UnsupportedModelError, match=r"cannot widen 'conv': Linear 'lin' reads"):
        dynarch.widen(model, "conv", 12)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)  # untouched
