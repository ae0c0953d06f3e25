"""Parameter-space merge engine: methods, sparsifiers, streaming apply and in-memory (resident) merges."""
