"""The non-weight files of a merged model directory: config, generation config, tokenizer, model card.

Everything is copied or written as JSON/text without importing transformers, so ``evo-merge apply``
starts fast. The model card (``README.md``) carries the recipe YAML, so the directory says how it was
made and ``evo-merge apply`` on the embedded recipe rebuilds it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from evomerge_opt._version import __version__
from evomerge_opt.io.atomic import atomic_write_text

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt",
)


def write_config(out_dir: Path, config: dict[str, Any], dtype: torch.dtype) -> None:
    """The base's ``config.json`` with the output dtype (``dtype`` for transformers 5, ``torch_dtype`` kept in step)."""
    config = dict(config)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    if isinstance(config.get("text_config"), dict) and "dtype" in config["text_config"]:
        config["text_config"] = {**config["text_config"], "dtype": name}
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_generation_config(out_dir: Path, base_dir: Path, config: dict[str, Any]) -> None:
    """Copy the base's ``generation_config.json``; without one, derive it from the config's token ids."""
    source = base_dir / "generation_config.json"
    if source.is_file():
        shutil.copyfile(source, out_dir / "generation_config.json")
        return
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None}
    generation["_from_model_config"] = True
    atomic_write_text(out_dir / "generation_config.json", json.dumps(generation, indent=2) + "\n")


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files present in ``tokenizer_dir``; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)
            copied.append(name)
    return copied


def render_model_card(recipe_yaml: str, *, base_model: str | None, sources: list[str], method: str,
                      dtype: torch.dtype, provenance: dict[str, Any] | None = None) -> str:
    """Markdown with a YAML front matter (tags, base_model) and the recipe that built the model."""
    front = ["---", "library_name: transformers", "tags:", "- merge", "- evo-merge", f"- {method}"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front.append("---")
    lines = front + [
        "",
        "# Merged model",
        "",
        (f"Built by evo-merge {__version__} with the `{method}` merge method, "
         f"stored as `{str(dtype).removeprefix('torch.')}`."),
        "",
        f"* base model: `{base_model}`" if base_model else "* base model: (none; linear merge)",
    ]
    lines += [f"* source: `{source}`" for source in sources]
    if provenance:
        lines += ["", "## Provenance", ""] + [f"* {key}: {value}" for key, value in provenance.items()]
    lines += [
        "",
        "## Recipe",
        "",
        "Rebuild this model with `evo-merge apply recipe.yml --out DIR` on:",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out_dir: Path, recipe_yaml: str, **kwargs: Any) -> None:
    atomic_write_text(out_dir / "README.md", render_model_card(recipe_yaml, **kwargs))


def recipe_from_model_card(text: str) -> str | None:
    """The recipe YAML embedded in a model card written by :func:`render_model_card` (None if absent)."""
    marker = "## Recipe"
    if marker not in text:
        return None
    rest = text.split(marker, 1)[1]
    if "```yaml\n" not in rest:
        return None
    return rest.split("```yaml\n", 1)[1].split("\n```", 1)[0] + "\n"
