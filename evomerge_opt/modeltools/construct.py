"""Build a model from a model config YAML, a model directory or a recipe, and write its output directory.

Sources (exactly one):

* ``config``: a model config YAML (:class:`~evomerge_opt.config.model_config.ModelConfigSpec`), with the
  dynamic size options applied on top. Weights are initialised with ``seed`` (or left uninitialised
  with ``init_weights=False``, or absent on ``meta``).
* ``model``: a Hugging Face model directory or ``zoo:NAME``. On ``meta`` only its config is used; on a
  real device its weights are loaded. The DFS wrappers (``EvoLlamaAffineForCausalLM``...) are loaded
  with evo-merge's own classes, other custom code only with ``trust_remote_code``.
* ``recipe``: a PS or DFS recipe YAML, built in memory first (needs a real device).

Output directory reuse: when the output directory already holds a model (``config.json``) and
``refresh`` is off, the model is loaded from it instead of being rebuilt from the sources (a warning
says so if the sources now describe a different model); ``refresh`` rebuilds it from the sources and
replaces the directory when it is written.

The output directory holds what ``AutoModelForCausalLM.from_pretrained`` needs: ``config.json``,
``generation_config.json``, tokenizer files when there is a tokenizer, weights (safetensors) when they
are saved, and for custom classes (the DFS wrappers) the modeling source plus ``auto_map``. Config
sources also get ``evomerge_model.yaml`` (the resolved spec). It is written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge_opt.config.model_config import ModelConfigSpec, dtype_name, parse_dtype
from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.io.checkpoint import read_config

logger = logging.getLogger(__name__)

SPEC_FILE = "evomerge_model.yaml"
DEFAULT_OUTPUT_ROOT = "output_models"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class ModelSource:
    """Where the model comes from. ``spec`` is set for config sources (overrides applied)."""

    kind: Literal["config", "model", "recipe"]
    path: str
    name: str
    spec: ModelConfigSpec | None = None

    def describe(self) -> str:
        return {"config": "model config", "model": "model directory", "recipe": "recipe"}[self.kind] + f" {self.path}"


@dataclass
class ConstructOptions:
    device: str = "meta"
    dtype: torch.dtype | None = None
    init_weights: bool = True
    seed: int = 0
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    format: str = "evo"  # DFS recipes: evo (Evo*Affine wrapper) or plain (standard Llama/Mistral, dfs.plain)


@dataclass
class BuiltModel:
    model: Any  # PreTrainedModel
    tokenizer: Any | None
    source: ModelSource
    weights: str  # how the weights came to be, for the report
    loaded_from: str  # the path the model was read from (the source or the reused output directory)
    reused_output_dir: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def on_meta(self) -> bool:
        first = next(self.model.parameters(), None)
        return first is not None and first.device.type == "meta"


# --------------------------------------------------------------------------------------------- sources


def load_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> ModelConfigSpec:
    """The :class:`ModelConfigSpec` of a model config YAML with ``overrides`` applied.

    A relative ``tokenizer`` path is taken relative to the YAML file's directory.
    """
    from evomerge_opt.config.yamlio import load_yaml
    from evomerge_opt.modeltools.options import apply_overrides

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a mapping of sizes, but got {type(data).__name__}.")
    spec = apply_overrides(data, overrides or {}, str(path))
    tok = spec.tokenizer
    if tok and not tok.startswith("zoo:") and not Path(tok).expanduser().is_absolute():
        candidate = Path(path).resolve().parent / tok
        if candidate.exists():
            spec = spec.model_copy(update={"tokenizer": str(candidate)})
    return spec


def make_source(
    config: str | None = None,
    model: str | None = None,
    recipe: str | None = None,
    overrides: dict[str, Any] | None = None,
    model_name: str | None = None,
) -> ModelSource:
    """Check that exactly one source is given and describe it."""
    given = [(k, v) for k, v in (("config", config), ("model", model), ("recipe", recipe)) if v]
    if len(given) != 1:
        names = ", ".join(f"--{k}" for k, _ in given) or "none"
        raise ConfigError(
            "exactly one model source must be given: --config MODEL_YAML, --model DIR|zoo:NAME or --recipe "
            f"RECIPE_YAML, but got {names}."
        )
    kind, value = given[0]
    overrides = overrides or {}
    if overrides and kind != "config":
        flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
        raise ConfigError(
            f"size options ({flags}) change a model config and apply to --config only, but the source is "
            f"--{kind} {value}; write a model config YAML instead."
        )
    if kind == "config":
        spec = load_spec(value, overrides)
        name = model_name or Path(value).stem
        return ModelSource("config", str(value), name, spec)
    if kind == "model":
        from evomerge_opt.io.sources import resolve_model_ref

        resolved = resolve_model_ref(value)
        name = model_name or Path(resolved.rstrip("/")).name
        return ModelSource("model", resolved, name)
    if not Path(value).is_file():
        raise ModelSourceError(f"Recipe {value!r} does not exist; check --recipe.")
    return ModelSource("recipe", str(value), model_name or Path(value).stem)


def default_output_dir(source: ModelSource) -> Path:
    return Path(DEFAULT_OUTPUT_ROOT) / source.name


# ---------------------------------------------------------------------------------------- construction


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device ({exc}); use meta, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} needs CUDA, but torch.cuda.is_available() is False; use --device cpu.")
    return dev


def _dfs_classes() -> dict[str, Any]:
    """Class name -> class of evo-merge's DFS wrappers (empty when the module is not available)."""
    try:
        from evomerge_opt.dfs import modeling_evo_affine as module
    except ImportError:
        return {}
    from transformers import PreTrainedModel

    return {
        name: obj for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == module.__name__
    }


def _model_class(path: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    """``(config, class_or_None)`` for a model directory; ``None`` means AutoModelForCausalLM."""
    from transformers import AutoConfig

    raw = read_config(path)
    arch = (raw.get("architectures") or [None])[0]
    dfs = _dfs_classes()
    if arch in dfs:
        cls = dfs[arch]
        return cls.config_class.from_pretrained(str(path)), cls
    if raw.get("auto_map") and not trust_remote_code:
        raise ConfigError(
            f"{str(path)!r} uses custom modeling code ({arch}, auto_map {raw['auto_map']}); pass "
            "--trust-remote-code if you trust that code."
        )
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), None
    except (ValueError, KeyError, OSError) as exc:
        raise ModelSourceError(f"Could not read the config of {str(path)!r}: {exc}") from None


def has_weights(path: Path) -> bool:
    return any(next(path.glob(pattern), None) is not None for pattern in WEIGHT_GLOBS)


def _attn_kwargs(options: ConstructOptions) -> dict[str, Any]:
    return {"attn_implementation": options.attn_implementation} if options.attn_implementation else {}


@contextlib.contextmanager
def _translate_attn_errors(options: ConstructOptions):
    try:
        yield
    except ImportError as exc:
        raise ConfigError(
            f"--attn-implementation {options.attn_implementation} is not available here: {exc}. "
            "Use sdpa or eager."
        ) from None
    except ValueError as exc:
        if options.attn_implementation and "attn" in str(exc).lower():
            raise ConfigError(f"--attn-implementation {options.attn_implementation} cannot be used: {exc}") from None
        raise


def model_from_config(config: Any, options: ConstructOptions, cls: Any = None) -> Any:
    """An instance of ``config``'s causal LM on ``options.device``.

    On ``meta`` nothing is allocated. On a real device the weights are initialised from ``options.seed``
    unless ``init_weights`` is off (then ``transformers.initialization.no_init_weights`` leaves the
    storage as allocated: uninitialised memory, to be overwritten by a checkpoint).
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    device = _check_device(options.device)
    dtype = options.dtype or parse_dtype(getattr(config, "dtype", None)) or torch.float32
    torch.manual_seed(options.seed)
    skip_init = not options.init_weights and device.type != "meta"
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device(device))
        if skip_init:
            stack.enter_context(no_init_weights())
        stack.enter_context(_translate_attn_errors(options))
        if cls is None:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **_attn_kwargs(options))
        else:
            model = cls._from_config(config, dtype=dtype, **_attn_kwargs(options))
    if skip_init:
        model.tie_weights()
    return model


def _weights_note(options: ConstructOptions) -> str:
    if options.device == "meta":
        return "none (meta device: nothing allocated)"
    if not options.init_weights:
        return "NOT initialised (--no-init-weights: storage holds arbitrary values until a checkpoint is loaded)"
    return f"random initialisation (seed {options.seed})"


def load_tokenizer_if_any(ref: str | None) -> Any | None:
    """The tokenizer at ``ref`` (dir or ``zoo:NAME``), ``None`` when ``ref`` is None or has no tokenizer files."""
    if not ref:
        return None
    from transformers import AutoTokenizer

    from evomerge_opt.io.sources import resolve_model_ref

    path = Path(resolve_model_ref(ref))
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"Could not load the tokenizer at {str(path)!r}: {exc}") from None


def load_model_dir(path: str | Path, options: ConstructOptions) -> tuple[Any, Any, str]:
    """``(model, tokenizer, weights note)`` of a model directory (config only on ``meta``)."""
    from evomerge_opt.io.sources import is_peft_adapter

    path = Path(path)
    if is_peft_adapter(path):
        if options.device == "meta":
            raise ConfigError(f"{str(path)!r} is a PEFT adapter: it is merged onto its base, which needs --device cpu.")
        from evomerge_opt.pool import load_causal_lm  # issue 2: merges the adapter onto its base

        model = load_causal_lm(str(path), dtype=options.dtype, device=options.device)
        return model, load_tokenizer_if_any(str(path)), f"adapter {path} merged onto its base"
    config, cls = _model_class(path, options.trust_remote_code)
    if options.device == "meta" or not has_weights(path):
        if not has_weights(path) and options.device != "meta":
            note = f"{_weights_note(options)}; {path} holds no weights"
        else:
            note = _weights_note(options)
        return model_from_config(config, options, cls), load_tokenizer_if_any(str(path)), note
    from transformers import AutoModelForCausalLM

    device = _check_device(options.device)
    loader = cls or AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": options.dtype or "auto", **_attn_kwargs(options)}
    if cls is None:
        kwargs["trust_remote_code"] = options.trust_remote_code
    with _translate_attn_errors(options):
        model = loader.from_pretrained(str(path), **kwargs)
    model = model.to(device)
    return model, load_tokenizer_if_any(str(path)), f"loaded from {path}"


def build_from_recipe(path: str, options: ConstructOptions) -> tuple[Any, Any]:
    """Build a PS or DFS recipe in memory: ``(model, tokenizer)``."""
    from evomerge_opt.config.recipe import load_recipe, recipe_kind
    from evomerge_opt.config.yamlio import load_yaml

    if options.device == "meta":
        raise ConfigError(
            "a recipe is built from the real weights of its source models, which the 'meta' device cannot hold; "
            "pass --device cpu (or cuda)."
        )
    device = str(_check_device(options.device))
    data = load_yaml(path)
    kind = recipe_kind(data)
    if options.format not in ("evo", "plain"):
        raise ConfigError(f"--format must be evo or plain, but got {options.format!r}.")
    if options.format == "plain" and kind != "dfs":
        raise ConfigError(f"--format plain applies to data-flow-space recipes; {path} is a {kind} recipe, whose "
                          "model is already a standard one. Drop --format.")
    if kind == "dfs" and options.format == "plain":
        return _build_plain_dfs(path, options, device)
    if kind == "dfs":
        from evomerge_opt.dfs.api import dfs_merge_from_config

        model, tokenizer = dfs_merge_from_config(path, output_path=None, device=device)
        if options.dtype is not None:
            model = model.to(options.dtype)
        return model, tokenizer
    recipe = load_recipe(path)
    from evomerge_opt.merge.build import build_ps_model

    model = build_ps_model(recipe, device=device, dtype=options.dtype)
    tok_ref = getattr(recipe, "tokenizer_source", None)
    if not tok_ref or tok_ref in ("base", "union"):
        tok_ref = recipe.base_model or recipe.models[0].model
    return model, load_tokenizer_if_any(str(tok_ref))


def _build_plain_dfs(path: str, options: ConstructOptions, device: str) -> tuple[Any, Any]:
    """A DFS recipe as the standard Llama/Mistral of ``--format plain`` (the same directory ``evo-merge
    apply --format plain`` writes, streamed to a temporary directory and loaded from it): ``(model, tokenizer)``.
    Saved in ``--dtype`` (default float32, so the folded scales lose nothing)."""
    import tempfile

    from evomerge_opt.dfs.stream import stream_dfs_apply

    dtype = options.dtype or torch.float32
    with tempfile.TemporaryDirectory(prefix="evomerge-plain-") as tmp:
        directory = stream_dfs_apply(path, Path(tmp) / "plain", format="plain", dtype=dtype)
        loader = _plain_loader(read_config(directory))
        kwargs: dict[str, Any] = {"dtype": dtype}
        if options.attn_implementation:
            kwargs["attn_implementation"] = options.attn_implementation
        with _translate_attn_errors(options):
            model = loader.from_pretrained(str(directory), **kwargs)
        # Materialise every tensor before the files go (loading may map them).
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
        tokenizer = load_tokenizer_if_any(str(directory))
    return model.to(device).eval(), tokenizer


def _plain_loader(config: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    archs = config.get("architectures") or []
    return AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in archs) \
        else AutoModelForCausalLM


def _spec_differences(stored: Path, spec: ModelConfigSpec) -> list[str]:
    from evomerge_opt.config.yamlio import load_yaml

    try:
        old = load_yaml(stored)
    except ConfigError:
        return ["(stored spec unreadable)"]
    new = spec.model_dump()
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]


def construct(
    source: ModelSource,
    options: ConstructOptions,
    output_dir: Path | None = None,
    refresh: bool = False,
) -> BuiltModel:
    """Build the model of ``source`` (or reuse ``output_dir`` when it already holds one; see module doc)."""
    if output_dir is not None and (output_dir / "config.json").is_file() and not refresh \
            and Path(source.path).resolve() != output_dir.resolve():
        notes = [(f"reusing existing output directory {output_dir} (pass --refresh-model / -r to rebuild it "
                  f"from {source.describe()})")]
        if source.spec is not None and (output_dir / SPEC_FILE).is_file():
            diffs = _spec_differences(output_dir / SPEC_FILE, source.spec)
            if diffs:
                notes.append("WARNING: the sources now describe a different model than the reused output "
                             f"directory ({'; '.join(diffs)}); pass -r to rebuild it.")
        logger.info("%s", notes[0])
        for note in notes[1:]:
            logger.warning("%s", note)
        model, tokenizer, weights = load_model_dir(output_dir, options)
        return BuiltModel(model, tokenizer, source, weights, str(output_dir), True, notes)
    if source.kind == "config" and source.spec is not None:
        spec = source.spec
        config = spec.to_hf_config()
        if options.dtype is not None:
            config.dtype = options.dtype
        model = model_from_config(config, options)
        tokenizer = load_tokenizer_if_any(spec.tokenizer)
        return BuiltModel(model, tokenizer, source, _weights_note(options), source.path)
    if source.kind == "model":
        model, tokenizer, weights = load_model_dir(source.path, options)
        return BuiltModel(model, tokenizer, source, weights, source.path)
    model, tokenizer = build_from_recipe(source.path, options)
    if options.attn_implementation:
        with _translate_attn_errors(options):
            model.set_attn_implementation(options.attn_implementation)
    return BuiltModel(model, tokenizer, source, f"built from recipe {source.path}", source.path)


# ------------------------------------------------------------------------------------------------ save


def is_dfs_model(model: Any) -> bool:
    return type(model).__name__ in _dfs_classes()


def save_output_dir(
    built: BuiltModel,
    output_dir: Path,
    save_weights: bool,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> list[str]:
    """Write ``output_dir`` atomically; return the file names written.

    Weights are safetensors (transformers 5 writes nothing else). Without ``save_weights`` only the
    definition is written (config, generation config, tokenizer, custom modeling source). An existing
    model directory is replaced when it was reused (its model is the one being saved) or with
    ``overwrite`` (``--refresh-model``); any other non-empty directory is refused.
    """
    from evomerge_opt.io.atomic import atomic_output_dir

    model = built.model
    if save_weights and built.on_meta:
        raise ConfigError(
            "--save-checkpoint needs a real device: pass --device cpu (the model on 'meta' has no weights to save)."
        )
    overwrite = overwrite or built.reused_output_dir
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(
            f"Output directory {str(output_dir)!r} exists, is not empty and holds no model (no config.json); "
            "pass --refresh-model / -r to replace it, or choose another --output-dir."
        )
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        if is_dfs_model(model):
            _save_dfs(built, staging, save_weights, max_shard_size)
        else:
            if save_weights:
                model.save_pretrained(str(staging), max_shard_size=max_shard_size)
            else:
                _save_definition(model, staging)
            if built.tokenizer is not None:
                built.tokenizer.save_pretrained(str(staging))
        if built.source.spec is not None and not built.reused_output_dir:
            from evomerge_opt.config.yamlio import save_yaml

            save_yaml(built.source.spec.model_dump(), staging / SPEC_FILE,
                      header=f"model config of {built.source.name}, written by `evo-merge model construct`")
        elif built.reused_output_dir and (output_dir / SPEC_FILE).is_file():
            (staging / SPEC_FILE).write_bytes((output_dir / SPEC_FILE).read_bytes())
        files = sorted(p.name for p in staging.iterdir())
    return files


def _save_definition(model: Any, directory: Path) -> None:
    """config.json (+ generation_config.json, + modeling source and auto_map for custom classes)."""
    model.config.dtype = dtype_name(model.dtype)
    model.config.architectures = [type(model).__name__]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, str(directory), config=model.config)
    model.config.save_pretrained(str(directory))
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))


def _save_dfs(built: BuiltModel, directory: Path, save_weights: bool, max_shard_size: str | int) -> None:
    """DFS wrappers are saved with the DFS package's own writer and its ``auto_map`` / modeling file.

    With weights: :func:`evomerge_opt.dfs.save.save_dfs_model`, in the dtype the model was constructed in
    (``--dtype``), with the recipe recorded beside it for a recipe source. Without weights (also on
    ``meta``): the config with the same ``auto_map``, the same self-contained modeling file, the
    generation config and the tokenizer.
    """
    from evomerge_opt.dfs import save as dfs_save

    model = built.model
    if save_weights:
        recipe = None
        if built.source.kind == "recipe":
            from evomerge_opt.config.dfs_recipe import load_dfs_recipe

            recipe = load_dfs_recipe(built.source.path)
        # `directory` is the (empty) staging directory of our atomic write; save_dfs_model replaces it atomically.
        dfs_save.save_dfs_model(model, built.tokenizer, directory, dtype=None, overwrite=True, recipe=recipe,
                                max_shard_size=max_shard_size)
        return
    import copy
    import shutil

    config = copy.deepcopy(model.config)
    config.dtype = dtype_name(model.dtype)
    config.architectures = [type(model).__name__]
    config.auto_map = dfs_save.auto_map_for(type(model))
    config.save_pretrained(str(directory))
    shutil.copy2(Path(dfs_save.evo.__file__), directory / dfs_save.MODELING_FILE)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))
    if built.tokenizer is not None:
        built.tokenizer.save_pretrained(str(directory))
