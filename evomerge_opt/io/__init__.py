"""Reading checkpoints lazily, resolving model references, writing output directories atomically."""
