"""Model pool (FusionBench's ``CausalLMPool`` API, seed 000) and model/tokenizer loading helpers.

Pool YAML::

    _target_: evomerge_opt.pool.CausalLMPool      # optional; fusion_bench.modelpool.CausalLMPool accepted
    models:
      _pretrained_: path/or/hub-id                 # a string -> AutoModelForCausalLM.from_pretrained
      model_a: zoo:math
      model_b:
        _target_: evomerge_opt.pool.load_peft_causal_lm   # only allow-listed targets are built
        base_model_path: zoo:base
        peft_model_path: path/to/lora
        torch_dtype: bfloat16
    model_kwargs: {torch_dtype: bfloat16}          # `dtype` and `torch_dtype` both accepted
    tokenizer: path/to/tokenizer                   # or {_target_: transformers.AutoTokenizer, ...}

Names starting and ending with ``_`` are reserved; only ``_pretrained_`` has a meaning. A ``_target_``
outside :data:`ALLOWED_TARGETS` is refused unless the pool is built with
``allow_arbitrary_targets=True`` or the environment sets ``EVOMERGE_ALLOW_ANY_TARGET=1``, because a
target is arbitrary code run with the YAML's arguments.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge_opt.config.model_config import parse_dtype
from evomerge_opt.errors import ConfigError, ModelSourceError
from evomerge_opt.io.atomic import atomic_output_dir
from evomerge_opt.io.sources import is_peft_adapter, resolve_model_ref

logger = logging.getLogger(__name__)

PRETRAINED = "_pretrained_"
ALLOWED_TARGETS = frozenset({
    "transformers.AutoModelForCausalLM",
    "transformers.AutoTokenizer",
    "transformers.AutoModelForSequenceClassification",
    "evomerge_opt.pool.load_peft_causal_lm",
})
# Pool classes accepted as the top-level _target_ of a pool YAML (FusionBench's name included).
POOL_TARGETS = frozenset({
    "evomerge_opt.pool.CausalLMPool", "evomerge_opt.pool.CausalLMBackbonePool",
    "fusion_bench.modelpool.CausalLMPool", "fusion_bench.modelpool.CausalLMBackbonePool",
})
POOL_KEYS = frozenset({"_target_", "models", "model_kwargs", "tokenizer", "_recursive_", "_usage_"})


def is_reserved_name(name: str) -> bool:
    return len(name) >= 2 and name.startswith("_") and name.endswith("_")


def _normalize_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``torch_dtype`` -> ``dtype`` (transformers 5 name) and dtype strings -> ``torch.dtype``."""
    out = dict(kwargs)
    if "torch_dtype" in out:
        value = out.pop("torch_dtype")
        out.setdefault("dtype", value)
    if isinstance(out.get("dtype"), str) and out["dtype"] != "auto":
        out["dtype"] = parse_dtype(out["dtype"])
    return out


def _from_pretrained(cls: Any, ref: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"Cannot load {ref!r} with {cls.__name__}.from_pretrained: {exc}") from exc


def load_peft_causal_lm(
    base_model_path: str,
    peft_model_path: str,
    torch_dtype: str | torch.dtype | None = "bfloat16",
    is_trainable: bool = True,
    merge_and_unload: bool = False,
) -> Any:
    """A causal LM with a PEFT adapter (e.g. LoRA) on its base; merged into plain weights if asked."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_ref = resolve_model_ref(base_model_path)
    adapter_ref = resolve_model_ref(peft_model_path)
    if not is_peft_adapter(adapter_ref):
        raise ModelSourceError(f"{peft_model_path!r} is not a PEFT adapter directory (no adapter_config.json).")
    kwargs = {} if torch_dtype is None else {"dtype": parse_dtype(torch_dtype) if isinstance(torch_dtype, str) else torch_dtype}
    base = _from_pretrained(AutoModelForCausalLM, base_ref, **kwargs)
    try:
        model = PeftModel.from_pretrained(base, adapter_ref, is_trainable=is_trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(f"Cannot load adapter {peft_model_path!r} onto {base_model_path!r}: {exc}") from exc
    if merge_and_unload:
        model = model.merge_and_unload()
    return model


def adapter_base_model(adapter_dir: str | os.PathLike[str]) -> str | None:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path")


def load_causal_lm(
    ref: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load ``ref`` (``zoo:``, path or hub id); a PEFT adapter is merged onto ``base_model`` (or its own base)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_ref(ref)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if is_peft_adapter(path):
        base = base_model or adapter_base_model(path)
        if not base:
            raise ModelSourceError(f"Adapter {str(ref)!r} names no base model; pass base_model=...")
        model = load_peft_causal_lm(base, path, torch_dtype=torch_dtype, is_trainable=False, merge_and_unload=True)
    else:
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = _from_pretrained(AutoModelForCausalLM, path, **kwargs)
    return model.to(device).eval()


def load_tokenizer(ref: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoTokenizer`` for ``ref``; for a PEFT adapter without tokenizer files, its base's tokenizer."""
    from transformers import AutoTokenizer

    path = resolve_model_ref(ref)
    if is_peft_adapter(path) and not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        base = adapter_base_model(path)
        if base:
            path = resolve_model_ref(base)
    return _from_pretrained(AutoTokenizer, path, **kwargs)


def _import_target(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"_target_ {target!r} must be a dotted path such as 'transformers.AutoModelForCausalLM'.")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"_target_ {target!r} cannot be imported: {exc}") from exc


class CausalLMPool:
    """Named causal LMs (and a tokenizer) described by YAML, loaded on demand (seed 000's API)."""

    def __init__(
        self,
        models: Mapping[str, Any],
        model_kwargs: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        allow_targets: Iterable[str] = (),
        allow_arbitrary_targets: bool | None = None,
    ) -> None:
        problems = []
        if not isinstance(models, Mapping) or not models:
            raise ConfigError("A model pool needs a non-empty `models` mapping of name -> model.")
        for name in models:
            if not isinstance(name, str):
                problems.append(f"models: names must be strings, but got {name!r}.")
            elif is_reserved_name(name) and name != PRETRAINED:
                problems.append(
                    f"models.{name}: names starting and ending with '_' are reserved; only '{PRETRAINED}' "
                    "has a meaning. Rename the model."
                )
        if problems:
            raise ConfigError("Invalid model pool:", problems)
        self._models = dict(models)
        self._model_kwargs = dict(model_kwargs or {})
        self._tokenizer = tokenizer
        self._allowed = ALLOWED_TARGETS | frozenset(allow_targets)
        if allow_arbitrary_targets is None:
            allow_arbitrary_targets = os.environ.get("EVOMERGE_ALLOW_ANY_TARGET", "") == "1"
        self._allow_any = allow_arbitrary_targets
        self._check_targets()

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | Mapping[str, Any], **kwargs: Any) -> CausalLMPool:
        """A pool from a YAML path or mapping (keys ``models``, ``model_kwargs``, ``tokenizer``, ``_target_``)."""
        if isinstance(config, (str, os.PathLike)):
            from evomerge_opt.config.yamlio import load_yaml

            data = load_yaml(config)
        else:
            data = dict(config)
        problems = pool_config_problems(data)
        if problems:
            raise ConfigError("Invalid model pool config:", problems)
        return cls(data["models"], data.get("model_kwargs"), data.get("tokenizer"), **kwargs)

    def _check_targets(self) -> None:
        specs = list(self._models.items()) + [("tokenizer", self._tokenizer)]
        for name, spec in specs:
            if isinstance(spec, Mapping) and "_target_" in spec:
                self._target_allowed(spec["_target_"], name)

    def _target_allowed(self, target: str, where: str) -> None:
        if target not in self._allowed and not self._allow_any:
            raise ConfigError(
                f"{where}: _target_ {target!r} is not on the allow-list ({', '.join(sorted(self._allowed))}); a "
                "_target_ runs arbitrary code. Opt in with allow_arbitrary_targets=True or EVOMERGE_ALLOW_ANY_TARGET=1."
            )

    # ---- names ---------------------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        """Model names without the reserved ones (e.g. ``_pretrained_``)."""
        return [name for name in self._models if not is_reserved_name(name)]

    @property
    def all_model_names(self) -> list[str]:
        return list(self._models)

    @property
    def has_pretrained(self) -> bool:
        return PRETRAINED in self._models

    def __len__(self) -> int:
        return len(self.model_names)

    def get_model_config(self, name: str) -> Any:
        if name not in self._models:
            raise ConfigError(f"No model named {name!r} in the pool; the pool has: {', '.join(self._models)}.")
        return self._models[name]

    def model_ref(self, name: str) -> str | None:
        """The path/hub id of a model given as a string or as ``pretrained_model_name_or_path`` (else None)."""
        spec = self.get_model_config(name)
        if isinstance(spec, (str, os.PathLike)):
            return str(spec)
        if isinstance(spec, Mapping):
            return spec.get("pretrained_model_name_or_path") or spec.get("peft_model_path")
        return None

    # ---- loading -------------------------------------------------------------------------------------

    def load_model(self, name: str, **overrides: Any) -> Any:
        """Load model ``name``; ``overrides`` replace ``model_kwargs`` (``torch_dtype="float32"`` etc.)."""
        spec = self.get_model_config(name)
        if isinstance(spec, torch.nn.Module):
            return spec
        kwargs = _normalize_kwargs({**self._model_kwargs, **overrides})
        if isinstance(spec, (str, os.PathLike)):
            path = resolve_model_ref(spec)
            if is_peft_adapter(path):
                base = self.model_ref(PRETRAINED) if self.has_pretrained and name != PRETRAINED else None
                return load_causal_lm(path, dtype=kwargs.get("dtype"), base_model=base)
            from transformers import AutoModelForCausalLM

            return _from_pretrained(AutoModelForCausalLM, path, **kwargs)
        if isinstance(spec, Mapping):
            return self._build_from_mapping(name, dict(spec), kwargs)
        raise ConfigError(f"models.{name}: expected a path/hub id or a mapping, but got {type(spec).__name__}.")

    def _build_from_mapping(self, name: str, spec: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        target = spec.pop("_target_", "transformers.AutoModelForCausalLM")
        self._target_allowed(target, f"models.{name}")
        obj = _import_target(target)
        if target == "evomerge_opt.pool.load_peft_causal_lm" or not hasattr(obj, "from_pretrained"):
            if "dtype" in kwargs and "torch_dtype" not in spec and target == "evomerge_opt.pool.load_peft_causal_lm":
                spec["torch_dtype"] = kwargs["dtype"]
            return obj(**spec)
        ref = spec.pop("pretrained_model_name_or_path", None)
        if ref is None:
            raise ConfigError(f"models.{name}: a {target} entry needs `pretrained_model_name_or_path`.")
        merged = _normalize_kwargs({**kwargs, **spec})
        return _from_pretrained(obj, resolve_model_ref(ref), **merged)

    def load_pretrained_model(self) -> Any:
        if not self.has_pretrained:
            raise ConfigError(f"The pool has no '{PRETRAINED}' model; it has: {', '.join(self._models)}.")
        return self.load_model(PRETRAINED)

    def load_pretrained_or_first_model(self) -> Any:
        return self.load_model(PRETRAINED if self.has_pretrained else self.model_names[0])

    def load_tokenizer(self, *args: Any, **kwargs: Any) -> Any:
        """The pool's tokenizer: ``tokenizer`` if set, else the ``_pretrained_`` (or first) model's."""
        spec = self._tokenizer
        if spec is None:
            spec = self.model_ref(PRETRAINED) if self.has_pretrained else None
            spec = spec or self.model_ref(self.model_names[0])
            if spec is None:
                raise ConfigError("The pool has no `tokenizer` and its first model gives no path to load one from.")
        if isinstance(spec, Mapping):
            spec = dict(spec)
            target = spec.pop("_target_", "transformers.AutoTokenizer")
            self._target_allowed(target, "tokenizer")
            obj = _import_target(target)
            ref = spec.pop("pretrained_model_name_or_path", None)
            if ref is None:
                raise ConfigError("tokenizer: a mapping needs `pretrained_model_name_or_path`.")
            return _from_pretrained(obj, resolve_model_ref(ref), *args, **{**spec, **kwargs})
        return load_tokenizer(spec, **kwargs)

    def save_model(
        self,
        model: Any,
        path: str | os.PathLike[str],
        save_tokenizer: bool = False,
        push_to_hub: bool = False,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        overwrite: bool = True,
        **save_kwargs: Any,
    ) -> Path:
        """``save_pretrained`` into ``path`` atomically (with the pool's tokenizer if asked); optional hub push."""
        path = Path(path)
        with atomic_output_dir(path, overwrite=overwrite) as staging:
            model.save_pretrained(staging, **save_kwargs)
            if save_tokenizer:
                self.load_tokenizer(**dict(tokenizer_kwargs or {})).save_pretrained(staging)
        if push_to_hub:
            try:
                model.push_to_hub(path.name)
            except Exception as exc:  # network/auth failures become one clear error
                raise ModelSourceError(f"Saved to {str(path)!r} but pushing to the hub failed: {exc}") from exc
        return path


class CausalLMBackbonePool(CausalLMPool):
    """Like :class:`CausalLMPool`, but ``load_model`` returns the decoder layers (``model.model.layers``)."""

    def load_model(self, name: str, **overrides: Any) -> Any:
        model = super().load_model(name, **overrides)
        return model.model.layers


def pool_config_problems(data: Any) -> list[str]:
    """Every problem of a pool config mapping (no model is loaded; local paths are checked)."""
    if not isinstance(data, Mapping):
        return [f"a pool config is a mapping, but got {type(data).__name__}."]
    problems = [f"{key}: unknown key; valid keys are: {', '.join(sorted(POOL_KEYS))}." for key in data if key not in POOL_KEYS]
    target = data.get("_target_")
    if target is not None and target not in POOL_TARGETS:
        problems.append(f"_target_: {target!r} is not a model pool class; use evomerge_opt.pool.CausalLMPool.")
    models = data.get("models")
    if not isinstance(models, Mapping) or not models:
        problems.append("models: a non-empty mapping of name -> model is required.")
        models = {}
    for name, spec in models.items():
        where = f"models.{name}"
        if is_reserved_name(str(name)) and name != PRETRAINED:
            problems.append(f"{where}: names starting and ending with '_' are reserved; only '{PRETRAINED}' has a meaning.")
        problems.extend(_spec_problems(where, spec))
    if "tokenizer" in data and data["tokenizer"] is not None:
        problems.extend(_spec_problems("tokenizer", data["tokenizer"]))
    kwargs = data.get("model_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            problems.append("model_kwargs: must be a mapping.")
        else:
            for key in ("dtype", "torch_dtype"):
                if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
                    try:
                        parse_dtype(kwargs[key])
                    except ConfigError as exc:
                        problems.append(f"model_kwargs.{key}: {exc}")
    return problems


def _spec_problems(where: str, spec: Any) -> list[str]:
    refs: list[str] = []
    if isinstance(spec, str):
        refs = [spec]
    elif isinstance(spec, Mapping):
        target = spec.get("_target_")
        if target is not None and target not in ALLOWED_TARGETS and os.environ.get("EVOMERGE_ALLOW_ANY_TARGET") != "1":
            return [f"{where}._target_: {target!r} is not on the allow-list ({', '.join(sorted(ALLOWED_TARGETS))})."]
        refs = [spec[k] for k in ("pretrained_model_name_or_path", "base_model_path", "peft_model_path") if k in spec]
        if not refs and target != "evomerge_opt.pool.load_peft_causal_lm":
            return [f"{where}: a mapping needs `pretrained_model_name_or_path`."]
    else:
        return [f"{where}: expected a path/hub id or a mapping, but got {spec!r}."]
    problems = []
    for ref in refs:
        try:
            resolve_model_ref(str(ref))
        except ModelSourceError as exc:
            problems.append(f"{where}: {exc}")
    return problems
