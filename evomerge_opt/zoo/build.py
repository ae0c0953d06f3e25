"""``build_zoo``: data, tokenizer, ``base`` / ``math`` / ``lang`` (+ Mistral twins), written atomically.

Layout of ``<root>`` (default :func:`evomerge_opt.paths.zoo_root`)::

    zoo.json                      settings, settings hash, versions, build time, task sizes
    base/ math/ lang/             Hugging Face Llama directories (safetensors + tokenizer)
    base_mistral/ math_mistral/ lang_mistral/   the same weights as MistralForCausalLM (twins)
    data/<task>/{train,dev,test}.jsonl          tasks english, math_en, lang, math_lang (no train)
    data/cipher.json              the word table of the made-up language

The build is cached by :meth:`ZooSettings.settings_hash`: when ``<root>/zoo.json`` carries the same hash,
``build_zoo`` returns at once. Otherwise everything is built into a staging directory beside ``root``
that replaces ``root`` only when complete, so a zoo is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

from evomerge_opt.config.model_config import ModelConfigSpec
from evomerge_opt.errors import ConfigError
from evomerge_opt.io.atomic import atomic_output_dir, atomic_write_text
from evomerge_opt.paths import zoo_root
from evomerge_opt.zoo.settings import ZOO_FORMAT_VERSION, FineTuneSettings, ZooSettings
from evomerge_opt.zoo.tasks import TARGET_TASK, TASKS, ZooData, build_data
from evomerge_opt.zoo.tokenizer import train_tokenizer
from evomerge_opt.zoo.train import Stream, pack, train_lm

logger = logging.getLogger(__name__)

MODELS = ("base", "math", "lang")
MANIFEST = "zoo.json"


def read_manifest(root: str | os.PathLike[str] | None = None) -> dict | None:
    """The ``zoo.json`` of the zoo at ``root`` (default root), or ``None`` when there is none."""
    path = Path(root or zoo_root()) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def is_built(settings: ZooSettings | None = None, root: str | os.PathLike[str] | None = None) -> bool:
    manifest = read_manifest(root)
    settings = settings or ZooSettings()
    return manifest is not None and manifest.get("settings_hash") == settings.settings_hash()


def build_zoo(
    settings: ZooSettings | None = None,
    root: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build the pico zoo into ``root`` (default ``zoo_root()``) unless the same settings are built there.

    Returns ``root``. A non-empty ``root`` that is not a zoo (no ``zoo.json``) is refused rather than
    replaced.
    """
    settings = settings or ZooSettings()
    root = Path(root) if root is not None else zoo_root()
    root = root.expanduser().resolve()
    if not force and is_built(settings, root):
        logger.info("pico zoo at %s is up to date (settings %s)", root, settings.settings_hash())
        return root
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise ConfigError(
            f"{str(root)!r} is not empty and holds no {MANIFEST}; the zoo would replace it. "
            "Choose an empty or new --root (or set EVOMERGE_ZOO)."
        )
    started = time.perf_counter()
    with _deterministic(settings.threads), atomic_output_dir(root, overwrite=True) as staging:
        info = _build_into(settings, staging, progress)
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_text(staging / MANIFEST, json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("pico zoo built at %s in %.0f s", root, time.perf_counter() - started)
    return root


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """One deterministic, few-thread torch for the build; the caller's settings are restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_tok = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # BPE training in one thread: same merges every run
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        if old_tok is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old_tok


def _write_data(data: ZooData, out: Path) -> dict[str, dict[str, int]]:
    sizes: dict[str, dict[str, int]] = {}
    for task in TASKS:
        sizes[task] = {}
        for split, records in data.splits[task].items():
            lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
            atomic_write_text(out / "data" / task / f"{split}.jsonl", lines)
            sizes[task][split] = len(records)
    data.cipher.save(out / "data" / "cipher.json")
    return sizes


def model_spec(settings: ZooSettings, tokenizer, architecture: str = "llama") -> ModelConfigSpec:
    m = settings.model
    return ModelConfigSpec(
        architecture=architecture,
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=True,
        # Mistral twin: a window as long as the context is full attention, i.e. exactly the Llama.
        sliding_window=m.max_position_embeddings if architecture == "mistral" else None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _new_model(spec: ModelConfigSpec, seed: int):
    from transformers import AutoModelForCausalLM

    config = spec.to_hf_config()
    config.initializer_range = 0.02
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _build_into(settings: ZooSettings, out: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    data = build_data(
        seed=settings.seed,
        max_paragraphs=settings.max_paragraphs,
        max_words=settings.max_words,
        num_number_sentences=settings.num_number_sentences,
        max_operand=settings.max_operand,
        eval_size=settings.eval_size,
        eval_size_text=settings.eval_size_text,
    )
    sizes = _write_data(data, out)
    train_texts = {task: data.texts(task, "train") for task in ("english", "lang", "math_en")}
    tokenizer = train_tokenizer(
        train_texts["english"] + train_texts["lang"] + train_texts["math_en"],
        settings.vocab_size,
        model_max_length=settings.model.max_position_embeddings,
    )
    windows = {task: pack(tokenizer, texts, settings.seq_len) for task, texts in train_texts.items()}
    timings = {"data_and_tokenizer": round(time.perf_counter() - t0, 1)}
    logger.info("zoo data + tokenizer ready (%.0f s); training windows %s", timings["data_and_tokenizer"],
                {k: tuple(v.shape) for k, v in windows.items()})

    spec = model_spec(settings, tokenizer)
    base = _new_model(spec, settings.seed)
    losses: dict[str, float] = {}

    def run(model, name: str, ft: FineTuneSettings, streams: list[Stream], seed_offset: int) -> None:
        t = time.perf_counter()
        curve = train_lm(
            model, streams, steps=ft.steps, batch_size=settings.batch_size, lr=ft.lr,
            seed=settings.seed * 1000 + seed_offset, trainable=ft.trainable, desc=f"zoo {name}", progress=progress,
        )
        losses[name] = round(sum(curve[-10:]) / min(10, len(curve)), 4)
        timings[name] = round(time.perf_counter() - t, 1)
        logger.info("zoo %s trained in %.0f s (final loss %.3f)", name, timings[name], losses[name])

    run(base, "base", settings.pretrain, [Stream(windows["english"], 1.0)], 1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    models = {"base": base_state}
    for name, task, offset in (("math", "math_en", 2), ("lang", "lang", 3)):
        ft: FineTuneSettings = getattr(settings, name)
        model = _new_model(spec, settings.seed)
        model.load_state_dict(base_state)
        streams = [Stream(windows[task], 1.0 - ft.english_mix)]
        if ft.english_mix > 0:
            streams.append(Stream(windows["english"], ft.english_mix))
        run(model, name, ft, streams, offset)
        models[name] = {k: v.clone() for k, v in model.state_dict().items()}

    t = time.perf_counter()
    architectures = ["llama"] + (["mistral"] if settings.mistral_twins else [])
    written = []
    for arch in architectures:
        arch_spec = spec if arch == "llama" else model_spec(settings, tokenizer, arch)
        model = _new_model(arch_spec, settings.seed)
        for name, state in models.items():
            model.load_state_dict(state)
            dirname = name if arch == "llama" else f"{name}_{arch}"
            model.save_pretrained(out / dirname)
            tokenizer.save_pretrained(out / dirname)
            written.append(dirname)
    timings["save"] = round(time.perf_counter() - t, 1)

    import tokenizers
    import transformers

    from evomerge_opt._version import __version__

    n_params = sum(v.numel() for k, v in base_state.items() if k != "lm_head.weight")
    return {
        "format_version": ZOO_FORMAT_VERSION,
        "settings": settings.model_dump(mode="json"),
        "settings_hash": settings.settings_hash(),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "evomerge_opt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version(),
        },
        "models": written,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "tasks": sizes,
        "target_task": TARGET_TASK,
        "final_train_loss": losses,
        "timings_seconds": timings,
    }
