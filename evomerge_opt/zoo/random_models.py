"""Tiny or benchmark-sized *random* model families: a base and fine-tunes that differ by small deltas.

Used by the unit tests (2 layers, hidden 32) and the benchmarks (SmolLM2-135M shape). Built locally,
so nothing is downloaded. A "fine-tune" is the base plus Gaussian noise of std ``delta_std`` on every
floating tensor, which is enough to exercise every merge method on real checkpoint layouts
(safetensors, tied embeddings, GQA, shards, bf16).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from evomerge_opt.config.model_config import ModelConfigSpec, parse_dtype

logger = logging.getLogger(__name__)

TINY_LLAMA = ModelConfigSpec(
    architecture="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
)
TINY_MISTRAL = ModelConfigSpec(
    architecture="mistral", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=16,
)
# SmolLM2-135M's shape: 30 layers, hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied.
SMOLLM2_135M = ModelConfigSpec(
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    rope_theta=100000.0, dtype="bfloat16",
)


def random_model(spec: ModelConfigSpec, seed: int = 0, init_std: float = 0.02):
    """A freshly initialised ``LlamaForCausalLM``/``MistralForCausalLM`` with deterministic weights."""
    from transformers import AutoModelForCausalLM

    config = spec.to_hf_config()
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dtype = parse_dtype(spec.dtype) or torch.float32
    # Cast parameters only: buffers such as rotary inv_freq stay float32, as from_pretrained keeps them.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.eval()


def perturbed_copy_(model: torch.nn.Module, delta_std: float, seed: int) -> torch.nn.Module:
    """Add N(0, delta_std^2) noise to every floating parameter of ``model`` in place (a fake fine-tune)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * delta_std
            param.add_(noise.to(param.dtype))
    return model


def save_random_family(
    spec: ModelConfigSpec,
    out_dir: str | Path,
    n_finetunes: int = 2,
    delta_std: float = 0.01,
    seed: int = 0,
    max_shard_size: str | int = "5GB",
    tokenizer=None,
) -> dict[str, Path]:
    """Write ``base`` and ``ft0..ft{n-1}`` under ``out_dir`` as HF directories; return name -> path.

    Each directory is written with ``save_pretrained`` (safetensors; ``max_shard_size`` makes several
    shards when small). ``tokenizer``, when given, is saved beside every model.
    """
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    base = random_model(spec, seed=seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for index, name in enumerate(["base"] + [f"ft{i}" for i in range(n_finetunes)]):
        if index:
            base.load_state_dict(state)
            perturbed_copy_(base, delta_std, seed=seed * 1000 + index)
        path = out_dir / name
        base.save_pretrained(path, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        paths[name] = path
        logger.debug("wrote random model %s to %s", name, path)
    return paths
