"""evo-merge: evolutionary merge-recipe optimizer for language models.

Public API (imported lazily so ``import evomerge_opt`` does not pull in torch):

* :func:`merge_recipe` — build a merged model in memory from a PS or DFS recipe (path, dict or
  recipe object); :func:`evomerge_opt.api.apply_recipe` writes it as a Hugging Face directory.
* :func:`dfs_merge_from_config` — the data-flow-space merge with the reference implementation's signature.
"""

from __future__ import annotations

from typing import Any

from evomerge_opt._version import __version__

__all__ = ["__version__", "dfs_merge_from_config", "merge_recipe"]


def __getattr__(name: str) -> Any:
    if name == "merge_recipe":
        from evomerge_opt.api import merge_recipe

        return merge_recipe
    if name == "dfs_merge_from_config":
        from evomerge_opt.dfs.api import dfs_merge_from_config

        return dfs_merge_from_config
    raise AttributeError(f"module 'evomerge_opt' has no attribute {name!r}")
