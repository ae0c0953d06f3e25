"""The plug-in names a config may use, without importing the registries that implement them.

Validation (``evo-merge validate``, ``apply``'s recipe check) runs before torch, the merge engine or
Optuna load, and ``config`` sits below ``merge`` and ``search``, so it cannot ask their registries.
These tables are what it checks against; ``tests/test_architecture.py`` keeps each equal to its
registry (add a new method, sparsifier, sampler or pruner to both).

* :data:`METHOD_NAMES` — ``evomerge_opt.merge.methods.METHODS``;
* :data:`SPARSIFIER_NAMES` — ``evomerge_opt.merge.sparsify.SPARSIFIERS``;
* :data:`RESCALES` — the rescale rules of ``evomerge_opt.merge.methods`` (``rescale_factor``);
* :data:`SAMPLER_NAMES` — ``evomerge_opt.search.samplers.SAMPLERS``;
* :data:`PRUNER_NAMES` — ``evomerge_opt.search.samplers.build_pruner``;
* :data:`STUDY_NAME_PATTERN` — study names (they name files under ``studies/``).
"""

from __future__ import annotations

import re

METHOD_NAMES: tuple[str, ...] = ("dare_linear", "dare_ties", "linear", "task_arithmetic", "ties")  # sorted, as Registry.names()
SPARSIFIER_NAMES: tuple[str, ...] = ("magnitude", "random", "sparsegpt")
RESCALES: tuple[str, ...] = ("inverse_density", "l1", "none")
SAMPLER_NAMES: tuple[str, ...] = ("cmaes", "nsgaii", "pycma", "random", "tpe")  # sorted, as Registry.names()
PRUNER_NAMES: tuple[str, ...] = ("median", "wilcoxon", "threshold", "percentile", "none")
STUDY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
