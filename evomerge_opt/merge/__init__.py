"""Parameter-space merge engine: methods, sparsifiers, streaming apply and in-memory (resident) merges.

Layout: ``_base.py`` (the plug-in contracts), ``methods/`` (the chunked kernel and one module per
method family), ``sparsify/`` (magnitude, random, importance/ with SparseGPT Hessians), ``params.py``
(recipe -> per-tensor parameters), ``sources.py`` (lazy readers), ``engine.py`` (streaming ``apply``),
``resident.py`` (in-memory merges for the search), ``build.py`` (PS recipe -> model).
"""
