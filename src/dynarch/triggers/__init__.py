"""Triggers: small stateful detectors that decide *when* (and some, *where*) to change structure.

A trigger is fed one observation at a time with :meth:`Trigger.update` and answers whether it
fires; :meth:`Trigger.reset` starts it over after the change is made, and
``state_dict()``/``load_state_dict()`` carry it through checkpoints (plain data, loadable with
``torch.load(weights_only=True)``). Triggers are registered by name in :data:`TRIGGERS`, so
configs can name them (:func:`make_trigger`); adding a trigger is one class with
``@register_trigger("name")``.

- :class:`Plateau` (``"plateau"``): a metric stalled for ``patience`` updates; reset it
  after growing.
- :class:`GradientVarianceSpike` (``"gradient_variance_spike"``): some layer's gradient
  variance spiked ``k`` standard deviations above its running mean; ``where()`` names layers.
- :class:`Budget` (``"budget"``): parameter/FLOP budget with ``can_grow``, ``must_prune``,
  ``headroom``; fires when the model is over budget.
- :class:`Contribution` (``"contribution"``): a module's counterfactual contribution on
  held-out data fell below a threshold (a prune candidate).
- :class:`CreditEconomy` (``"credit_economy"``): credits earned per correct prediction, spent
  per added connection/unit; fires when one connection is affordable.
- :class:`Every` (``"every"``): every ``n``-th update (a fixed schedule as a trigger).
- :func:`all_of` / :func:`any_of` (:class:`AllOf` ``"all_of"`` / :class:`AnyOf` ``"any_of"``):
  every child is updated with the same value; fires when all / any fire.

Per-unit activation triggers (``Extrema``: dead/saturated units; ``Utilization``: fraction of
non-zero activations) live in :mod:`dynarch.activity`, register here by name and are
importable from here (``from dynarch.triggers import Extrema``).

Triggers that watch the training loop give a Trainer callback: ``GradientVarianceSpike``
observes gradients after each backward (``spike.callback()``) and ``CreditEconomy`` earns from
each batch's correct predictions (``economy.callback()``).

    >>> t = make_trigger("plateau", patience=2, threshold=0.1)
    >>> [t.update(v) for v in (1.0, 0.95, 0.97)]
    [False, False, True]
    >>> either = any_of(Plateau(patience=1), {"name": "plateau", "patience": 1, "mode": "max"})
    >>> [either.update(v) for v in (1.0, 2.0, 0.5)], either.last
    ([False, True, True], [False, True])
"""

from __future__ import annotations

# Order matters: dynarch.callbacks imports Plateau, check_mode and check_state from here.
from .base import (
    TRIGGERS,
    Trigger,
    check_mode,
    check_number,
    check_state,
    make_trigger,
    register_trigger,
)
from .plateau import Plateau  # isort: split

from .budget import Budget
from .compose import AllOf, AnyOf, Composite, all_of, any_of
from .contribution import CONTRIBUTION_METRICS, Contribution
from .credit import CreditEconomy
from .every import Every
from .gradients import GradientVarianceSpike

__all__ = [
    "CONTRIBUTION_METRICS",
    "TRIGGERS",
    "AllOf",
    "AnyOf",
    "Budget",
    "Composite",
    "Contribution",
    "CreditEconomy",
    "Every",
    "Extrema",
    "GradientVarianceSpike",
    "Plateau",
    "Trigger",
    "Utilization",
    "all_of",
    "any_of",
    "check_mode",
    "check_number",
    "check_state",
    "make_trigger",
    "register_trigger",
]


def __getattr__(name: str) -> object:
    """``Extrema`` and ``Utilization`` live in :mod:`dynarch.activity` (which builds on this
    package); they are importable from here too, loaded on first use."""
    if name in ("Extrema", "Utilization"):
        from .. import activity

        return getattr(activity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
