"""DARE (Yu et al. 2023): a ``Bernoulli(k_i)`` mask and ``inverse_density`` rescale, then TIES' election
(``dare_ties``) or a weighted sum (``dare_linear``)."""

from __future__ import annotations

from evomerge_opt.merge.methods._base import METHODS
from evomerge_opt.merge.methods.task_arithmetic import TaskArithmetic
from evomerge_opt.merge.methods.ties import Ties


@METHODS.register("dare_ties")
class DareTies(Ties):
    name = "dare_ties"
    default_sparsify = "random"
    default_rescale = "inverse_density"


@METHODS.register("dare_linear")
class DareLinear(TaskArithmetic):
    name = "dare_linear"
    default_sparsify = "random"
    default_rescale = "inverse_density"
    default_normalize = True
