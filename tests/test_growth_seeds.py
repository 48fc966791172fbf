"""The optimal seed finder: runs, per-configuration table, baseline, winner, processes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dynarch.data import Dataset
from dynarch.growth.seeds import SeedSearch, find_seed


def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return (x[:300], y[:300]), (x[300:], y[300:])


OPTS: dict = {"epochs": 5, "batch_size": 32, "lr": 0.05}


def test_search_table_orders_by_weights_and_picks_the_smallest_learner() -> None:
    s = find_seed(_data(), hidden_options=[(), (4,)], densities=[0.25, 1.0], seeds=[0, 1], **OPTS)
    assert [(r["hidden"], r["density"], r["seed"]) for r in s.runs] == [
        ((), 0.25, 0), ((), 0.25, 1), ((), 1.0, 0), ((), 1.0, 1),
        ((4,), 0.25, 0), ((4,), 0.25, 1), ((4,), 1.0, 0), ((4,), 1.0, 1),
    ]  # fmt: skip
    assert [(r["hidden"], r["density"], r["weights"], r["params"]) for r in s.rows] == [
        ((), 0.25, 4, 6), ((4,), 0.25, 10, 16), ((), 1.0, 16, 18), ((4,), 1.0, 40, 46),
    ]  # fmt: skip
    assert s.baseline == 0.52  # majority class of the 100 test labels
    assert s.threshold == pytest.approx(0.57)
    for row in s.rows:
        key = (row["hidden"], row["density"])
        accs = [r["accuracy"] for r in s.runs if (r["hidden"], r["density"]) == key]
        assert row["mean_accuracy"] == pytest.approx(sum(accs) / 2)
        assert row["min_accuracy"] == min(accs) and row["seeds"] == 2
        assert row["learns"] == (row["mean_accuracy"] > s.threshold)
    assert s.winner is next(r for r in s.rows if r["learns"])
    assert s.rows[2]["learns"] and s.rows[2]["mean_accuracy"] > 0.9  # dense single layer
    lines = s.table().splitlines()
    assert lines[0].split(" | ")[-1] == "learns |" and len(lines) == 6
    assert lines[2].startswith("| [] | 0.25 | 4 | 6 | ")
    assert sum(line.endswith(" *|") or line.endswith("yes * |") for line in lines) == 1


def test_nothing_learns_with_a_large_margin() -> None:
    s = find_seed(_data(), hidden_options=[()], densities=[1.0], seeds=[0], margin=0.5, **OPTS)
    assert s.winner is None and s.rows[0]["learns"] is False
    assert s.table().splitlines()[2].endswith("| no |")


def test_ties_prefer_higher_accuracy_then_order() -> None:
    runs = [
        {"hidden": (2,), "density": 0.5, "seed": 0, "weights": 6, "params": 9, "accuracy": 0.7},
        {"hidden": (3,), "density": 0.5, "seed": 0, "weights": 6, "params": 9, "accuracy": 0.9},
        {"hidden": (4,), "density": 0.5, "seed": 0, "weights": 6, "params": 9, "accuracy": 0.9},
    ]
    s = SeedSearch(runs, baseline=0.5, threshold=0.6)
    assert [r["hidden"] for r in s.rows] == [(3,), (4,), (2,)]
    assert s.winner is not None and s.winner["hidden"] == (3,)


def test_dataset_input_and_global_rng_restored() -> None:
    (x, y), (tx, ty) = _data()
    ds = Dataset("toy", x, y, tx, ty, 3, (8,))  # 3 classes: baseline max(0.52, 1/3)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    s = find_seed(ds, hidden_options=[()], densities=[0.5], seeds=[3], **OPTS)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert s.baseline == 0.52 and s.rows[0]["weights"] == 12  # 8 x 3 at 50%


def test_parallel_spawn_workers_give_the_same_results() -> None:
    kwargs = {"hidden_options": [()], "densities": [0.25], "seeds": [0, 1], **OPTS}
    serial = find_seed(_data(), jobs=1, **kwargs)
    parallel = find_seed(_data(), jobs=2, **kwargs)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in serial.runs]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in parallel.runs] == strip
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hidden_options": "16"}, ValueError, r"hidden_options must be a non-empty list"),
        ({"hidden_options": [(0,)]}, ValueError, r"hidden width must be an int >= 1, got 0"),
        ({"densities": [0.0]}, ValueError, r"densities must be a non-empty list of numbers in"),
        ({"seeds": []}, ValueError, r"seeds must be a non-empty list of ints >= 0"),
        ({"seeds": [-1]}, ValueError, r"seed must be an int >= 0, got -1"),
        ({"epochs": 0}, ValueError, r"epochs must be an int >= 1, got 0"),
        ({"jobs": 0}, ValueError, r"jobs must be an int >= 1, got 0"),
        ({"margin": -0.1}, ValueError, r"margin must be a number >= 0, got -0.1"),
        ({"lr": 0}, ValueError, r"lr must be a finite number > 0, got 0"),
        ({"distribution": "gauss"}, ValueError, r"unknown distribution 'gauss'; allowed: 'unif"),
        ({"seeds": [0, 0]}, ValueError, r"seeds lists 0 more than once; give each once"),
        ({"densities": [0.5, 0.5]}, ValueError, r"densities lists 0.5 more than once; give each"),
        ({"hidden_options": [(4,), (4,)]}, ValueError, r"hidden_options lists \(4,\) more than"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        find_seed(_data(), **kwargs)


def test_bad_data() -> None:
    with pytest.raises(TypeError, match=r"data must be a dynarch.data.Dataset or \(\(train_x"):
        find_seed(torch.zeros(3))
    (x, y), test = _data()
    with pytest.raises(TypeError, match=r"int64 class labels"):
        find_seed(((x, y.float()), test))
    with pytest.raises(TypeError, match=r"data inputs x must be floating point, got torch.int64"):
        find_seed(((x.long(), y), test))


def test_float64_inputs_give_the_float32_results() -> None:
    (x, y), (tx, ty) = _data()
    opts = {**OPTS, "hidden_options": [(4,)], "densities": [0.5], "seeds": [0]}
    wide = find_seed(((x.double(), y), (tx.double(), ty)), **opts)
    assert wide.rows == find_seed(((x, y), (tx, ty)), **opts).rows
