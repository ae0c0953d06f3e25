"""Parameter-space merge engine: methods, sparsifiers, streaming apply and in-memory (resident) merges."""

import sys as _sys
import types as _types
from typing import Any as _Any


class _CallableModule(_types.ModuleType):
    """``evomerge_opt.merge`` is both this subpackage and the public function ``merge(recipe) -> model``:
    once the subpackage is imported, ``evomerge_opt.merge`` names it, so calling it must merge."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        from evomerge_opt.merge.api import merge

        return merge(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
