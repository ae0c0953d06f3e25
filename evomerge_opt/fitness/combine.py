"""How many datasets become one objective value (the documented weighted rule).

Every dataset ``i`` has a value in its own unit and a *cost* ``c_i`` (lower is better) in a unit that
can be averaged:

================  =====================  ==========================  ===========
kind              value ``v_i``           cost ``c_i``                direction
================  =====================  ==========================  ===========
``perplexity``    ``exp(L_i)``            ``L_i`` (mean NLL, nats)    minimize
``accuracy``      fraction correct        ``1 - v_i`` (error rate)    maximize
``lower``         an lm-eval score        ``v_i``                     minimize
================  =====================  ==========================  ===========

The single objective is the weighted mean cost ``C = sum_i w_i c_i / sum_i w_i``, minimised, reported in
the natural unit when the datasets agree:

* every dataset perplexity: ``exp(C) = exp(sum w_i L_i / sum w_i)`` (objective ``perplexity``, minimise)
  — exactly the value the perplexity-only evaluator always gave;
* every dataset an accuracy: ``1 - C = sum w_i v_i / sum w_i`` (objective ``accuracy``, maximise);
* a mix: ``C`` itself (objective ``cost``, minimise). One point of accuracy (0.01) then weighs as much as
  0.01 nats of loss at equal weights; weights trade them off.

All three orderings are the same (``exp`` and ``1 - x`` are monotone), so the rule is one rule. A
dataset that has seen no batch yet (a running value) is left out of the sums; a non-finite cost makes
the value NaN (the search fails such a candidate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evomerge_opt.fitness.spec import Direction

KINDS = ("perplexity", "accuracy", "lower")


def objective_for(kinds: Sequence[str]) -> tuple[str, Direction]:
    """The single objective's name and direction for datasets of these kinds."""
    unique = set(kinds)
    if unique == {"perplexity"}:
        return "perplexity", "minimize"
    if unique == {"accuracy"}:
        return "accuracy", "maximize"
    return "cost", "minimize"


def safe_exp(value: float) -> float:
    """``exp`` that gives inf instead of raising on overflow (NaN stays NaN)."""
    return float("inf") if value > 700 else math.exp(value)


def weighted_cost(costs: Sequence[float], weights: Sequence[float]) -> float:
    """``sum w_i c_i / sum w_i`` (the same expression, in the same order, as the perplexity evaluator)."""
    return sum(w * c for w, c in zip(weights, costs)) / sum(weights)


def combine(kinds: Sequence[str], values: Sequence[float], costs: Sequence[float],
            weights: Sequence[float]) -> float:
    """The single objective value of datasets with these kinds, values, costs and weights (NaN when empty).

    Accuracy-only sets average the values themselves (``sum w_i v_i / sum w_i``, not ``1 - C``, which
    rounds differently)."""
    if not costs:
        return math.nan
    name, _ = objective_for(kinds)
    if name == "accuracy":
        return weighted_cost(values, weights)
    cost = weighted_cost(costs, weights)
    return safe_exp(cost) if name == "perplexity" else cost
