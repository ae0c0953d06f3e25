"""evo-merge: evolutionary merge-recipe optimizer for language models.

Public API (imported lazily so ``import evomerge_opt`` does not pull in torch):

* :func:`merge` — build a merged model in memory from a recipe (path, dict or Recipe object).
* :func:`dfs_merge_from_config` — seed-003 data-flow-space merge.
"""

from __future__ import annotations

from typing import Any

from evomerge_opt._version import __version__

__all__ = ["__version__", "dfs_merge_from_config", "merge"]


def __getattr__(name: str) -> Any:
    if name == "merge":
        from evomerge_opt.merge.api import merge

        return merge
    if name == "dfs_merge_from_config":
        from evomerge_opt.dfs.api import dfs_merge_from_config

        return dfs_merge_from_config
    raise AttributeError(f"module 'evomerge_opt' has no attribute {name!r}")
