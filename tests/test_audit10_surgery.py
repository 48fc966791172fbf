"""Audit 10, surgery: widen/shrink refuse what they cannot change (tied weights, computed
weights, units on the wrong axis, shared norms, DataParallel) before touching anything, a
checkpoint widened through a LayerNorm loads, and L-BFGS / Rprop / Adagrad state survives.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.nn.utils import parametrizations

import dynarch
from dynarch.graph import UnsupportedModelError
from dynarch.prune import structured_prune


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _held(opt: torch.optim.Optimizer) -> list[int]:
    return [id(p) for g in opt.param_groups for p in g["params"]]


def _assert_untouched(
    model: nn.Module,
    before: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer | None = None,
    held: list[int] | None = None,
) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(after[k], v), k
    assert dynarch.history(model) == []
    if opt is not None:
        assert _held(opt) == held


# -- 1. tied weights ------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.b(F.relu(self.a(F.relu(self.inp(x)))))))


class TwoBlocks(nn.Module):
    """``b1`` shares ``a1``'s weight but lies outside its channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b1, self.b2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.b1.weight = self.a1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a2(F.relu(self.a1(x))))
        return self.out(F.relu(self.b2(F.relu(self.b1(x)))))


TIE = "layers '{}' and '{}' share one weight tensor \\(tied weights\\)"


@pytest.mark.parametrize(
    ("make", "op", "target", "pair"),
    [
        (Tied, lambda m, o: dynarch.widen(m, "a", 12, optimizer=o), "widen 'a'", ("a", "b")),
        (Tied, lambda m, o: dynarch.widen(m, "inp", 12, optimizer=o), "widen 'inp'", ("a", "b")),
        (Tied, lambda m, o: dynarch.shrink(m, "a", [0, 3], optimizer=o), "shrink 'a'", ("a", "b")),
        (Tied, lambda m, o: structured_prune(m, "a", 2, optimizer=o), "shrink 'a'", ("a", "b")),
        (
            TwoBlocks,
            lambda m, o: structured_prune(m, "a1", 2, optimizer=o),
            "shrink 'a1'",
            ("a1", "b1"),
        ),
    ],
)
def test_tied_weights_refused_untouched(
    make: Callable[[], nn.Module], op: Callable, target: str, pair: tuple[str, str]
) -> None:
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, held = _snapshot(model), _held(opt)
    with pytest.raises(UnsupportedModelError, match=f"cannot {target}: " + TIE.format(*pair)):
        op(model, opt)
    _assert_untouched(model, before, opt, held)
    first, second = (getattr(model, n) for n in pair)
    assert first.weight is second.weight


def test_tied_message_says_how_to_untie() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        dynarch.widen(Tied(), "a", 12)
    assert str(info.value).endswith(
        "untie them first (b.weight = nn.Parameter(a.weight.detach().clone())) "
        "or change another layer"
    )


def test_untied_copy_widens() -> None:
    torch.manual_seed(0)
    model = Tied()
    model.b.weight = nn.Parameter(model.a.weight.detach().clone())
    x = torch.randn(5, 4)
    before = model(x)
    dynarch.widen(model, "a", 12)
    assert model.a.out_features == 12 and model.b.in_features == 12
    assert torch.allclose(model(x), before, atol=1e-5)


# -- 2. replay of a widen through a LayerNorm (init="random") --------------------------------


def test_layernorm_random_widen_checkpoint_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    dynarch.widen(model, "0", 12, init="random", optimizer=opt)
    dynarch.shrink(model, "0", [0, 2, 4, 6, 8, 10], optimizer=opt)
    dynarch.widen(model, "0", 9, init="random", optimizer=opt)
    gen_state = dynarch.engine_state(model).generator.get_state()
    path = dynarch.save(tmp_path / "ck", model, opt)
    ck = dynarch.load(path)
    assert ck.model[0].out_features == 9 and tuple(ck.model[1].normalized_shape) == (9,)
    assert ck.model[3].in_features == 9
    x = torch.randn(3, 4)
    assert torch.equal(ck.model(x), model(x))
    assert [e.op for e in dynarch.history(ck.model)] == ["widen", "shrink", "widen"]
    assert torch.equal(dynarch.engine_state(ck.model).generator.get_state(), gen_state)


# -- 3. computed weights (parametrizations, torch.nn.utils.prune) ----------------------------

COMPUTED = (
    "'{}' computes its {} from other parameters \\(a parametrization such as weight_norm or "
    "spectral_norm, or torch.nn.utils.prune\\), so it cannot be resized; remove it first"
)


def _mlp(bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(nn.Linear(6, 8), *mid, nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("prepare", "op", "where", "attr"),
    [
        (lambda m: parametrizations.weight_norm(m[0]), "widen", "0", "weight"),
        (lambda m: parametrizations.weight_norm(m[2]), "widen", "2", "weight"),
        (lambda m: parametrizations.spectral_norm(m[2]), "shrink", "2", "weight"),
        (lambda m: torch_prune.l1_unstructured(m[0], "weight", 0.5), "widen", "0", "weight"),
        (lambda m: torch_prune.l1_unstructured(m[0], "bias", 0.5), "shrink", "0", "bias"),
    ],
)
def test_computed_weights_refused_untouched(
    prepare: Callable, op: str, where: str, attr: str
) -> None:
    model = _mlp()
    prepare(model)
    model.eval()  # spectral_norm's power iteration updates its buffers in training mode
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(5, 6)
    out = model(x)
    before, held = _snapshot(model), _held(opt)
    with pytest.raises(
        UnsupportedModelError, match=f"cannot {op} '0': " + COMPUTED.format(where, attr)
    ):
        if op == "widen":
            dynarch.widen(model, "0", 12, optimizer=opt)
        else:
            dynarch.shrink(model, "0", [0, 1, 2], optimizer=opt)
    _assert_untouched(model, before, opt, held)
    assert torch.equal(model(x), out)


def test_computed_norm_weight_refused() -> None:
    model = _mlp(bn=True)
    torch_prune.random_unstructured(model[1], "weight", 0.5)
    before = _snapshot(model)
    with pytest.raises(
        UnsupportedModelError, match="cannot widen '0': " + COMPUTED.format("1", "weight")
    ):
        dynarch.widen(model, "0", 12)
    _assert_untouched(model, before)


def test_remap_is_atomic(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error while the new tensors are computed leaves every module as it was."""
    import dynarch.remap as remap_mod

    def boom(*args: object) -> None:
        raise RuntimeError("boom")

    model = _mlp(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before, held = _snapshot(model), _held(opt)
    monkeypatch.setattr(remap_mod, "_remap_norm", boom)
    with pytest.raises(RuntimeError, match="boom"):
        dynarch.widen(model, "0", 12, optimizer=opt)
    _assert_untouched(model, before, opt, held)
    assert model[0].out_features == 8 and model[3].in_features == 8


# -- 4. units on the last axis read over axis 1 ----------------------------------------------


class LastAxisBN(nn.Module):
    def __init__(self, channels: int, length: int = 5, width: int = 7) -> None:
        super().__init__()
        self.fc = nn.Linear(length, width)
        self.bn = nn.BatchNorm1d(channels)
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, L)
        return self.out(F.relu(self.bn(self.fc(x)))).sum(1)


class LastAxisConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4, H, 6)
        return self.conv(F.relu(self.fc(x))).sum()


class LastAxisBN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm2d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4, H, 6)
        return self.out(self.bn(self.fc(x))).sum()


@pytest.mark.parametrize(
    ("make", "x", "why"),
    [
        (
            lambda: LastAxisBN(9),
            torch.randn(4, 9, 5),
            "BatchNorm1d 'bn' \\(9 features\\) normalises axis 1 of its input, but these 7 units "
            "lie on its last axis",
        ),
        (
            lambda: LastAxisBN(6),
            torch.randn(4, 6, 5),
            "BatchNorm1d 'bn' \\(6 features\\) normalises axis 1 of its input, but these 7 units "
            "lie on its last axis",
        ),
        (
            LastAxisBN2d,
            torch.randn(2, 4, 5, 6),
            "BatchNorm2d 'bn' \\(4 features\\) normalises axis 1 of its input, but these 4 units "
            "lie on its last axis",
        ),
        (
            LastAxisConv,
            torch.randn(2, 4, 5, 6),
            "Conv2d 'conv' reads axis 1 as its channels, but these units lie on the last axis",
        ),
    ],
)
def test_last_axis_units_read_over_axis_1_refused(
    make: Callable[[], nn.Module], x: torch.Tensor, why: str
) -> None:
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    opt.step()
    before, held = _snapshot(model), _held(opt)
    for op in (
        lambda: dynarch.widen(model, "fc", 8, optimizer=opt),
        lambda: dynarch.shrink(model, "fc", [0, 1], optimizer=opt),
    ):
        with pytest.raises(UnsupportedModelError, match=why):
            op()
        _assert_untouched(model, before, opt, held)
    model(x)  # still runs


def test_batchnorm1d_on_units_still_widens() -> None:
    model = _mlp(bn=True).eval()
    x = torch.randn(5, 6)
    before = model(x)
    dynarch.widen(model, "0", 12)
    assert model[1].num_features == 12
    assert torch.allclose(model(x), before, atol=1e-5)


# -- 5. one norm shared by two spaces ---------------------------------------------------------


class SharedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.ha, self.hb = nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.ha(F.relu(self.bn(self.a(x)))) + self.hb(F.relu(self.bn(self.b(z))))


@pytest.mark.parametrize("target", ["a", "b"])
def test_norm_shared_by_two_spaces_refused(target: str) -> None:
    torch.manual_seed(0)
    model = SharedNorm()
    before = _snapshot(model)
    with pytest.raises(
        UnsupportedModelError,
        match=f"cannot widen '{target}': 'bn' is called 2 times on inputs of different channel "
        "spaces",
    ):
        dynarch.widen(model, target, 12)
    _assert_untouched(model, before)
    model(torch.randn(5, 4), torch.randn(5, 3))


# -- 6. L-BFGS ------------------------------------------------------------------------------


def _lbfgs_setup() -> tuple[nn.Module, torch.optim.LBFGS, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return model, opt, closure


LBFGS_RESET = "L-BFGS keeps a flat history over all its parameters, which cannot be index-mapped"


@pytest.mark.parametrize(
    "op",
    [
        lambda m, o: dynarch.widen(m, "0", 12, optimizer=o),
        lambda m, o: dynarch.shrink(m, "0", [1, 4, 6], optimizer=o),
        lambda m, o: dynarch.deepen(m, "0", optimizer=o),
    ],
)
def test_lbfgs_reset_and_steps_like_a_fresh_one(op: Callable) -> None:
    model, opt, _ = _lbfgs_setup()
    with pytest.warns(UserWarning, match=LBFGS_RESET) as record:
        op(model, opt)
    assert len([w for w in record if LBFGS_RESET in str(w.message)]) == 1
    assert not any(opt.state.values())
    assert _held(opt) == [id(p) for p in model.parameters()]
    twin = copy.deepcopy(model)
    fresh = torch.optim.LBFGS(twin.parameters(), lr=0.1, max_iter=3)
    x, y = torch.randn(32, 6), torch.randn(32, 3)

    def make(m: nn.Module, o: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def c() -> torch.Tensor:
            o.zero_grad()
            loss = (m(x) - y).pow(2).mean()
            loss.backward()
            return loss

        return c

    opt.step(make(model, opt))
    fresh.step(make(twin, fresh))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt._numel_cache == sum(p.numel() for p in model.parameters())


def test_lbfgs_without_state_no_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.LBFGS(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynarch.widen(model, "0", 12, optimizer=opt)
    x = torch.randn(4, 6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt._numel_cache == sum(p.numel() for p in model.parameters())


# -- 7. keep / sources validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "keep",
    [
        torch.tensor([0.7, 2.9], dtype=torch.bfloat16),
        torch.tensor([0.7, 2.9], dtype=torch.float16),
        torch.tensor([0, 2], dtype=torch.complex64),
        torch.tensor([0, 2], dtype=torch.complex128),
        torch.tensor([True, False]),
    ],
)
def test_shrink_keep_non_integer_dtypes_refused(keep: torch.Tensor) -> None:
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(
        ValueError,
        match=f"keep must be a non-empty 1-D tensor of unit indices, got {keep.dtype} of shape",
    ):
        dynarch.shrink(model, "0", keep)
    _assert_untouched(model, before)


@pytest.mark.parametrize("keep", [{0, 2}, frozenset({1, 3})])
def test_shrink_keep_set_refused(keep: set[int]) -> None:
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(
        ValueError,
        match=f"keep must be a 1-D tensor or list of unit indices, got a {type(keep).__name__}, "
        "which has no order; pass a list \\(e.g. sorted\\(keep\\)\\)",
    ):
        dynarch.shrink(model, "0", keep)  # type: ignore[arg-type]
    _assert_untouched(model, before)


def test_shrink_keep_garbage_refused() -> None:
    with pytest.raises(ValueError, match="keep must be a 1-D tensor or list of unit indices, got"):
        dynarch.shrink(_mlp(), "0", ["a", "b"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "keep", [[0, 2, 5], torch.tensor([5, 0, 2], dtype=torch.int32), range(0, 6, 2), (2, 0)]
)
def test_shrink_keep_integer_forms_accepted(keep: object) -> None:
    model = _mlp()
    w = model[0].weight.detach().clone()
    dynarch.shrink(model, "0", keep)  # type: ignore[arg-type]
    idx = sorted(int(i) for i in keep)  # type: ignore[attr-defined]
    assert torch.equal(model[0].weight, w[idx])


@pytest.mark.parametrize(
    ("sources", "match"),
    [
        (torch.tensor([0, 1], dtype=torch.complex128), "got torch.complex128 of shape \\(2,\\)"),
        (torch.tensor([0, 1], dtype=torch.bfloat16), "got torch.bfloat16 of shape \\(2,\\)"),
        ({0, 1}, "got a set, which has no order; pass a list"),
    ],
)
def test_widen_sources_non_integer_refused(sources: object, match: str) -> None:
    model = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="sources must be a 1-D tensor or list of unit indices, "):
        dynarch.widen(model, "0", 10, sources=sources)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        dynarch.widen(model, "0", 10, sources=sources)  # type: ignore[arg-type]
    _assert_untouched(model, before)


# -- 8. DataParallel ----------------------------------------------------------------------------


def test_dataparallel_points_to_module() -> None:
    dp = nn.DataParallel(_mlp())
    before = _snapshot(dp)
    msg = (
        "cannot change a model wrapped in DataParallel; operate on the wrapped model, "
        "model.module \\(its layers are named without the 'module.' prefix\\)"
    )
    with pytest.raises(UnsupportedModelError, match=msg):
        dynarch.widen(dp, "module.0", 12)
    with pytest.raises(UnsupportedModelError, match=msg):
        dynarch.deepen(dp, "module.0")
    _assert_untouched(dp, before)
    dynarch.widen(dp.module, "0", 12)
    assert dp.module[0].out_features == 12


# -- 9. per-element state whose fresh value is not zero -------------------------------------


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_rprop_new_units_start_at_lr(init: str) -> None:
    model = _mlp()
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    _train(model, opt, 5)
    old = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    old_cols = opt.state[model[2].weight]["step_size"].clone()
    dynarch.widen(model, "0", 12, optimizer=opt, init=init)
    st = opt.state[model[0].weight]
    assert torch.equal(st["step_size"][:8], old["step_size"])
    assert torch.equal(st["step_size"][8:], torch.full((4, 6), 0.01))
    assert torch.equal(st["prev"][:8], old["prev"])
    assert torch.equal(st["prev"][8:], torch.zeros(4, 6))
    assert torch.equal(opt.state[model[0].bias]["step_size"][8:], torch.full((4,), 0.01))
    cols = opt.state[model[2].weight]["step_size"]
    assert torch.equal(cols[:, :8], old_cols)
    assert torch.equal(cols[:, 8:], torch.full((3, 4), 0.01))
    w = model[0].weight.detach().clone()
    _train(model, opt, 3)
    assert (model[0].weight[8:] - w[8:]).abs().min() > 1e-3  # new units train


def test_adagrad_new_units_start_at_initial_accumulator() -> None:
    model = _mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5)
    _train(model, opt, 2)
    old = opt.state[model[0].weight]["sum"].clone()
    dynarch.widen(model, "0", 11, optimizer=opt)
    acc = opt.state[model[0].weight]["sum"]
    assert torch.equal(acc[:8], old)
    assert torch.equal(acc[8:], torch.full((3, 6), 0.5))
