"""Growth: StructureNet methods that add capacity where activity statistics point.

* :func:`connect` — turn positions of a masked layer on (the mask-growth primitive; new
  positions are flagged in the ``weight_patch`` buffer);
* :func:`add_patches` — extrema-guided dense patches around units, embedded in the masks;
* :func:`clone_units` — vertical cloning of units with the Net2Net split;
* :func:`add_skip` — a zero-initialised forward skip projection between two modules;
* :func:`highways` — dead units repurposed as long-range skips;
* :func:`grow_proportional` — growth proportional to size, preferring skips, at constant
  active-connection count;
* :class:`Tournament` — candidate actions (patch, insert, widen, skip) scored by ΔMI/ΔParams
  (:func:`mutual_information`), the best affordable one applied;
* :class:`IndefiniteGrowth` — train → analyse extrema → insert a sparse layer at the
  bottleneck → repeat, with a stopping rule;
* :class:`MultiScale` — multi-scale bootstrapping with hierarchical / data-driven init;
* :func:`find_seed` — the smallest sparse seed network that learns (parallel processes);
* :class:`PatchesAction` — patches as a grow-as-needed schedule action (``"patches"``).

Every change goes through one engine transaction (an :class:`~dynarch.events.Event`) and is
rebuilt by :func:`dynarch.load`. Statistics come from :mod:`dynarch.activity`.

Example:
    >>> import torch, torch.nn as nn
    >>> from dynarch.activity import Extrema
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> ex = Extrema(model); ex.observe(torch.randn(16, 4))
    >>> sorted(ex.fractions()["0"])
    ['dead', 'saturated']
"""

from __future__ import annotations

from .actions import BudgetEconomy, PatchesAction
from .candidates import KINDS, Candidate
from .clone import clone_units
from .connect import PATCH, connect
from .highways import highways
from .indefinite import GrowthRound, IndefiniteGrowth, converge, grow_indefinitely
from .mi import layer_mi, mutual_information, probe_mi
from .multiscale import MultiScale, MultiScaleResult, decisive_init, hierarchical_init
from .patches import add_patches, patch_positions
from .proportional import grow_proportional
from .seeds import SeedSearch, find_seed
from .skip import SkipConnection, add_skip, skips
from .tournament import Tournament, TournamentCallback

__all__ = [
    "KINDS",
    "PATCH",
    "BudgetEconomy",
    "Candidate",
    "GrowthRound",
    "IndefiniteGrowth",
    "MultiScale",
    "MultiScaleResult",
    "PatchesAction",
    "SeedSearch",
    "SkipConnection",
    "Tournament",
    "TournamentCallback",
    "add_patches",
    "add_skip",
    "clone_units",
    "connect",
    "converge",
    "decisive_init",
    "find_seed",
    "grow_indefinitely",
    "grow_proportional",
    "hierarchical_init",
    "highways",
    "layer_mi",
    "mutual_information",
    "patch_positions",
    "probe_mi",
    "skips",
]
