# Data-flow-space (DFS) merged Llama / Mistral models: Evo*Affine wrappers.
#
# SELF-CONTAINED: this file imports only torch and transformers, because evo-merge copies it into every
# DFS output directory (with `auto_map` in config.json), so that
#     AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
# works where evo-merge is not installed.
#
# Semantics (Akiba et al. 2024, "Evolutionary optimization of model merging recipes"):
# the hidden state h [batch, seq, D] passes through T hops. Hop t applies an affine map
#     h <- S_t * h + b_t
# (S_t a scalar, a D-vector applied elementwise, or a D x D matrix applied as h @ S_t.T, i.e. S_t acting
# on h as a column vector; b_t a scalar or a D-vector) and then the decoder layer (m_t, l_t) of source
# model m_t, with the whole residual stream entering the layer. Embeddings come from the
# `input_layer_model`, the final norm and head from the `output_layer_model`.
#
# Storage: a decoder layer used at several hops is stored once (`model.layers` holds the P unique
# "physical" layers; `config.hop_to_physical[t]` maps hop t to one of them). The KV cache is indexed by
# hop, not by physical layer: `config.num_hidden_layers` is T, so `DynamicCache(config=config)` has one
# cache layer per hop, and each hop's layer writes into cache layer t through `_HopCacheView`, whatever
# `layer_idx` its attention module holds.
#
# Portability (verified on transformers 4.57.6, 5.0.0, 5.12.1, 5.23.0, 5.24.0 and 5.25.0): the parts of
# transformers that moved between those versions are not used, or are used after detecting the feature
# (signatures and dataclass fields, never version numbers):
# * the attention mask for eager / sdpa attention is built here (`_causal_mask`), exactly as
#   transformers' masking utilities build it (same boolean / additive pattern and the same sdpa
#   "is_causal" shortcut), instead of calling `create_causal_mask`, whose keywords changed
#   (`input_embeds` -> `inputs_embeds`, `past_key_values` -> `cache`); other attention implementations
#   (flash, flex) get the library's mask, called with the keywords its signature has;
# * the cache keyword of the decoder layers (`past_key_values` up to 5.23, `cache` from 5.24), whether
#   they take `cache_position`, and the cache field of the output classes are read from signatures;
# * every cache layer is a full one (`config.layer_types` = "full_attention" per hop): a sliding
#   window (Mistral) is applied by the mask, so the keys a hop sees are always positions 0..past+q-1
#   and the mask never depends on how a version crops sliding-window caches (a cache longer than the
#   window costs memory, not correctness);
# * a config saved by transformers 5 (`rope_parameters`) is read by 4.x configs too (`rope_theta`,
#   `rope_scaling`), so the rotary embedding is the same on every version.
from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, MistralConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

SCALE_KINDS = ("none", "scalar", "vector", "matrix")
BIAS_KINDS = ("none", "scalar", "vector")

# Config attributes that describe the routing; everything else is the source architecture's config.
EVO_CONFIG_KEYS = (
    "hop_table",
    "hop_to_physical",
    "physical_layers",
    "scale_kinds",
    "bias_kinds",
    "input_layer_model",
    "output_layer_model",
    "num_r",
    "num_source_models",
    "source_num_layers",
    "source_model_names",
)


def _init_evo_fields(config, kwargs: dict) -> dict:
    """Pop the DFS routing fields from ``kwargs`` into ``config`` (defaults: the identity path)."""
    hop_table = [list(map(int, pair)) for pair in (kwargs.pop("hop_table", None) or [])]
    config.hop_table = hop_table
    physical = kwargs.pop("physical_layers", None)
    if physical is None:  # default: one physical layer per distinct (model, layer), in first-use order
        physical = []
        for pair in hop_table:
            if pair not in physical:
                physical.append(pair)
    config.physical_layers = [list(map(int, pair)) for pair in physical]
    hop_to_physical = kwargs.pop("hop_to_physical", None)
    if hop_to_physical is None:
        hop_to_physical = [config.physical_layers.index(pair) for pair in hop_table]
    config.hop_to_physical = [int(i) for i in hop_to_physical]
    config.scale_kinds = list(kwargs.pop("scale_kinds", None) or ["none"] * len(hop_table))
    config.bias_kinds = list(kwargs.pop("bias_kinds", None) or ["none"] * len(hop_table))
    config.input_layer_model = int(kwargs.pop("input_layer_model", 0))
    config.output_layer_model = int(kwargs.pop("output_layer_model", 0))
    config.num_r = int(kwargs.pop("num_r", 1))
    config.num_source_models = int(kwargs.pop("num_source_models", 1))
    config.source_num_layers = list(kwargs.pop("source_num_layers", None) or [])
    config.source_model_names = list(kwargs.pop("source_model_names", None) or [])
    if hop_table:
        # The cache (and every per-layer config list) has one entry per hop.
        kwargs["num_hidden_layers"] = len(hop_table)
    # Set after the parent's __init__ (`_finish_evo_config`): passing it would make some versions' Mistral
    # config warn about alternating attention.
    kwargs.pop("layer_types", None)
    return kwargs


def _parameters(function) -> set[str]:
    """Names of ``function``'s parameters (through ``functools.wraps`` decorators); empty if unknown."""
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def _takes_rope_parameters(config_cls) -> bool:
    """Whether the installed config class reads ``rope_parameters`` (transformers 5) or only
    ``rope_theta`` / ``rope_scaling`` (4.x)."""
    fields = getattr(config_cls, "__dataclass_fields__", None) or {}
    return "rope_parameters" in fields or "rope_parameters" in _parameters(config_cls.__init__)


def _legacy_rope(config_cls, kwargs: dict) -> dict:
    """On 4.x configs: ``rope_parameters`` (as transformers 5 writes it) -> ``rope_theta`` + ``rope_scaling``."""
    rope = kwargs.get("rope_parameters")
    if not isinstance(rope, dict) or _takes_rope_parameters(config_cls):
        return kwargs
    kwargs = dict(kwargs)
    kwargs.pop("rope_parameters")
    if rope.get("rope_theta") is not None:
        kwargs.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        kwargs.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return kwargs


def _finish_evo_config(config) -> None:
    # Every cache layer is a full one; a sliding window is applied by the attention mask (see the header).
    config.layer_types = ["full_attention"] * len(config.hop_table or [None] * config.num_hidden_layers)
    _check_evo_fields(config)


def _check_evo_fields(config) -> None:
    """Consistency of the routing fields (raised as ValueError: this file must not import evo-merge)."""
    num_hops = len(config.hop_table)
    for name in ("hop_to_physical", "scale_kinds", "bias_kinds"):
        if len(getattr(config, name)) != num_hops:
            raise ValueError(
                f"`len({name}) == len(hop_table)` must hold, but got {len(getattr(config, name))} != {num_hops}."
            )
    for t, p in enumerate(config.hop_to_physical):
        if not 0 <= p < len(config.physical_layers):
            raise ValueError(f"hop_to_physical[{t}] = {p} is out of range for {len(config.physical_layers)} layers.")
        if list(config.physical_layers[p]) != list(config.hop_table[t]):
            raise ValueError(
                f"hop {t} is {config.hop_table[t]} but its physical layer {p} is {config.physical_layers[p]}."
            )
    for t, kind in enumerate(config.scale_kinds):
        if kind not in SCALE_KINDS:
            raise ValueError(f"scale_kinds[{t}] = {kind!r}; valid kinds are {SCALE_KINDS}.")
    for t, kind in enumerate(config.bias_kinds):
        if kind not in BIAS_KINDS:
            raise ValueError(f"bias_kinds[{t}] = {kind!r}; valid kinds are {BIAS_KINDS}.")


class EvoLlamaAffineConfig(LlamaConfig):
    """A Llama config plus the DFS routing (hop table, physical layers, scale/bias kinds)."""

    model_type = "evo_llama_affine"

    def __init__(self, **kwargs):
        kwargs = _legacy_rope(LlamaConfig, _init_evo_fields(self, kwargs))
        super().__init__(**kwargs)
        _finish_evo_config(self)


class EvoMistralAffineConfig(MistralConfig):
    """A Mistral config (sliding window kept) plus the DFS routing."""

    model_type = "evo_mistral_affine"

    def __init__(self, **kwargs):
        kwargs = _legacy_rope(MistralConfig, _init_evo_fields(self, kwargs))
        super().__init__(**kwargs)
        _finish_evo_config(self)


class EvoAffineHop(nn.Module):
    """The affine map of one hop: ``h <- S * h + b`` on h [batch, seq, D].

    ``scale`` is absent ("none": S = 1), a 0-d tensor ("scalar"), [D] ("vector", elementwise) or [D, D]
    ("matrix", applied as ``h @ S.T``); ``bias`` is absent, 0-d or [D]. Absent terms cost nothing, so the
    identity path reproduces the source model bit for bit.
    """

    def __init__(
        self,
        hidden_size: int,
        scale_kind: str = "none",
        bias_kind: str = "none",
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.scale_kind = scale_kind
        self.bias_kind = bias_kind
        shapes = {"scalar": (), "vector": (hidden_size,), "matrix": (hidden_size, hidden_size)}
        if scale_kind == "none":
            self.register_parameter("scale", None)
        else:
            if scale is None:
                scale = torch.eye(hidden_size) if scale_kind == "matrix" else torch.ones(shapes[scale_kind])
            if tuple(scale.shape) != shapes[scale_kind]:
                raise ValueError(f"{scale_kind} scale must have shape {shapes[scale_kind]}, got {tuple(scale.shape)}.")
            self.scale = nn.Parameter(scale, requires_grad=False)
        if bias_kind == "none":
            self.register_parameter("bias", None)
        else:
            if bias is None:
                bias = torch.zeros(shapes[bias_kind])
            if tuple(bias.shape) != shapes[bias_kind]:
                raise ValueError(f"{bias_kind} bias must have shape {shapes[bias_kind]}, got {tuple(bias.shape)}.")
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            if self.scale_kind == "matrix":
                hidden_states = nn.functional.linear(hidden_states, self.scale)  # h @ S.T
            else:
                hidden_states = hidden_states * self.scale
        if self.bias is not None:
            hidden_states = hidden_states + self.bias
        return hidden_states

    def extra_repr(self) -> str:
        return f"scale={self.scale_kind}, bias={self.bias_kind}"


class _HopCacheView:
    """The KV cache as seen by the decoder layer of one hop: its keys/values go to cache layer ``hop``.

    Attention modules call ``cache.update(k, v, self.layer_idx, ...)``; a physical layer shared by
    several hops has one ``layer_idx``, so the view replaces it by the hop index. Everything else is read
    from the underlying cache.
    """

    __slots__ = ("_cache", "_hop")

    def __init__(self, cache, hop: int) -> None:
        self._cache = cache
        self._hop = hop

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self._cache.update(key_states, value_states, self._hop, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cache, name)


# Per decoder-layer class: (keyword its forward takes the cache by, whether it takes cache_position).
_LAYER_CALL: dict[type, tuple[str, bool]] = {}


def _layer_call(layer: nn.Module) -> tuple[str, bool]:
    cls = type(layer)
    style = _LAYER_CALL.get(cls)
    if style is None:
        params = _parameters(cls.forward)
        # transformers >= 5.24 decoder layers take `cache` (and only map `past_key_values` onto it with a
        # FutureWarning); earlier ones take `past_key_values`.
        style = ("cache" if "cache" in params else "past_key_values", "cache_position" in params)
        _LAYER_CALL[cls] = style
    return style


def _cache_field(output_cls) -> str:
    """The name of the cache field of a transformers output class (`cache` from 5.24, else `past_key_values`)."""
    names = {field.name for field in dataclasses.fields(output_cls)}
    return "cache" if "cache" in names else "past_key_values"


def _output(output_cls, cache, **fields):
    fields[_cache_field(output_cls)] = cache
    return output_cls(**fields)


def _check_cache(cache) -> None:
    if not isinstance(cache, DynamicCache):
        raise ValueError(  # noqa: TRY004 (transformers raises ValueError for unsupported caches too)
            f"Evo*Affine models index the KV cache by hop and support DynamicCache only, but got "
            f"{type(cache).__name__}; pass DynamicCache(config=model.config) or let generate() create it."
        )
    layers = getattr(cache, "layers", None) or []
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError(
            "Evo*Affine models need full (non-sliding) cache layers: the sliding window is applied by the "
            "attention mask; pass DynamicCache(config=model.config) (its layer_types are all full_attention)."
        )


def _causal_mask(config, inputs_embeds, attention_mask, past_seen: int, cache, position_ids, cache_position):
    """The attention mask every hop uses, for queries at positions past_seen.. and keys at 0..past+q-1.

    eager: additive float mask [B, 1, q, kv] (0 where attended, dtype min elsewhere); sdpa: boolean mask
    [B, 1, q, kv] (True where attended), or None when sdpa's ``is_causal`` gives the same pattern (no
    padding, and q == 1 or kv == q, and the window does not cut in) — the choices transformers' own
    masking utilities make, so an identity path reproduces the source model bit for bit. A 4D mask given
    by the caller is used as it is. Other attention implementations get transformers' mask function.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    impl = getattr(config, "_attn_implementation", None) or "eager"
    window = getattr(config, "sliding_window", None)
    if impl not in ("eager", "sdpa"):
        return _library_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position, window)
    batch, q_len = inputs_embeds.shape[0], inputs_embeds.shape[1]
    kv_len = past_seen + q_len
    device = inputs_embeds.device
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)
        if padding.shape[-1] < kv_len:  # as transformers: keys beyond the given mask are padding
            padding = nn.functional.pad(padding, (0, kv_len - padding.shape[-1]))
        padding = padding[:, :kv_len]
    if (
        impl == "sdpa"
        and (q_len == 1 or kv_len == q_len)
        and (window is None or kv_len < window)
        and (padding is None or bool(padding.all()))
    ):
        return None
    q_pos = torch.arange(past_seen, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos  # [q, kv]
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    mask = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    if impl == "eager":
        mask = torch.where(mask, torch.zeros((), device=device, dtype=inputs_embeds.dtype),
                           torch.finfo(inputs_embeds.dtype).min)
    return mask


def _library_mask(config, inputs_embeds, attention_mask, cache, position_ids, cache_position, window):
    """transformers' mask function for flash/flex/... attention, called with the keywords it takes."""
    from transformers import masking_utils

    function = masking_utils.create_sliding_window_causal_mask if window is not None else masking_utils.create_causal_mask
    params = _parameters(function)
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return function(**kwargs)


def _family_parts(family: str):
    if family == "mistral":
        return MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding
    return LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


class _EvoAffinePreTrainedModel(PreTrainedModel):
    """Shared behaviour of the Evo*Affine models (weight init of hops; no re-init of referenced layers)."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _skip_keys_device_placement = ("past_key_values", "cache")
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _evo_family = "llama"

    # Set by `from_modules`: the model REFERENCES layers of already-initialised source models; running
    # weight init or weight tying on them would overwrite the sources.
    _evo_by_reference = False

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, EvoAffineHop):
            # Loaded tensors carry `_is_hf_initialized` (transformers 5), and some versions (5.0) run weight
            # init over loaded modules too, trusting init functions to skip them: so must this one.
            scale, bias = module.scale, module.bias
            if scale is not None and not getattr(scale, "_is_hf_initialized", False):
                if module.scale_kind == "matrix":
                    scale.copy_(torch.eye(scale.shape[0], dtype=scale.dtype))
                else:
                    scale.fill_(1.0)
            if bias is not None and not getattr(bias, "_is_hf_initialized", False):
                bias.zero_()
            return
        super()._init_weights(module)

    def init_weights(self):
        if self._evo_by_reference:
            return
        super().init_weights()


class _EvoAffineModel(_EvoAffinePreTrainedModel):
    """Embeddings -> T affine hops over shared physical decoder layers -> final norm."""

    def __init__(self, config, parts: dict | None = None) -> None:
        super().__init__(config)
        decoder_cls, norm_cls, rotary_cls = _family_parts(self._evo_family)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        hidden = config.hidden_size
        if parts is not None:
            # In-memory candidate: modules of the source models, by reference (no copies).
            self._evo_by_reference = True
            self.embed_tokens = parts["embed_tokens"]
            self.layers = nn.ModuleList(parts["layers"])
            self.norm = parts["norm"]
            self.rotary_emb = parts["rotary_emb"]
            self.hops = nn.ModuleList(parts["hops"])
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, hidden, self.padding_idx)
            self.layers = nn.ModuleList([decoder_cls(config, p) for p in range(len(config.physical_layers))])
            self.norm = norm_cls(hidden, eps=config.rms_norm_eps)
            self.rotary_emb = rotary_cls(config=config)
            self.hops = nn.ModuleList(
                [EvoAffineHop(hidden, s, b) for s, b in zip(config.scale_kinds, config.bias_kinds)]
            )
        self.hop_to_physical = list(config.hop_to_physical)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        # The cache arrives as `cache` (transformers >= 5.24) or `past_key_values` (earlier).
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        kwargs.pop("output_attentions", None)
        kwargs.pop("return_dict", None)
        cache_position = kwargs.pop("cache_position", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # one full cache layer per hop
        if cache is not None:
            _check_cache(cache)
        past_seen = cache.get_seq_length() if cache is not None else 0
        q_len = inputs_embeds.shape[1]
        if cache_position is None:
            cache_position = torch.arange(past_seen, past_seen + q_len, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        causal_mask = _causal_mask(
            self.config, inputs_embeds, attention_mask, past_seen, cache, position_ids, cache_position
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states = [] if output_hidden_states else None
        for hop_index, hop in enumerate(self.hops):
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = hop(hidden_states)
            layer = self.layers[self.hop_to_physical[hop_index]]
            cache_keyword, takes_cache_position = _layer_call(layer)
            layer_kwargs = dict(kwargs)
            if takes_cache_position:
                layer_kwargs["cache_position"] = cache_position
            layer_kwargs[cache_keyword] = None if cache is None else _HopCacheView(cache, hop_index)
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **layer_kwargs,
            )
            if isinstance(hidden_states, tuple):  # decoder layers of some versions return (hidden, ...)
                hidden_states = hidden_states[0]
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return _output(
            BaseModelOutputWithPast,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


class _ReuseGenerationConfig:
    """Stands in for ``generation_config_class`` during a by-reference build: returns a given config."""

    def __init__(self, generation_config) -> None:
        self._generation_config = generation_config

    def from_model_config(self, model_config):
        return self._generation_config


class _EvoAffineForCausalLM(_EvoAffinePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (transformers API)

    def __init__(self, config, parts: dict | None = None) -> None:
        reuse = None if parts is None else parts.get("generation_config")
        if reuse is not None:
            # PreTrainedModel.__init__ derives a GenerationConfig from the config (a third of the cost of
            # an in-memory build); a candidate uses its input model's, so hand that one over instead.
            object.__setattr__(self, "generation_config_class", _ReuseGenerationConfig(reuse))
        super().__init__(config)
        self.__dict__.pop("generation_config_class", None)
        self.model = self._backbone_class(config, parts)
        self.vocab_size = config.vocab_size
        if parts is not None:
            self._evo_by_reference = True
            self.lm_head = parts["head"]
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # logits_to_keep: an int keeps the last n positions (0 = all), a tensor gives the positions.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return _output(
            CausalLMOutputWithPast,
            getattr(outputs, _cache_field(type(outputs))),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
        )


class _EvoAffineForSequenceClassification(_EvoAffinePreTrainedModel):
    def __init__(self, config, parts: dict | None = None) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self._backbone_class(config, parts)
        if parts is not None:
            self._evo_by_reference = True
            self.score = parts["head"]
        else:
            self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # [batch, seq, num_labels]
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad_token_id is None or input_ids is None:
            last_non_pad_token = -1
        else:
            # The rightmost token that is not padding (works for left and right padding).
            non_pad_mask = (input_ids != pad_token_id).to(logits.device, torch.int32)
            token_indices = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_non_pad_token = (token_indices * non_pad_mask).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_non_pad_token]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return _output(
            SequenceClassifierOutputWithPast,
            getattr(outputs, _cache_field(type(outputs))),
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
        )


class EvoLlamaAffinePreTrainedModel(_EvoAffinePreTrainedModel):
    config_class = EvoLlamaAffineConfig
    config: EvoLlamaAffineConfig
    _no_split_modules = ("LlamaDecoderLayer",)
    _evo_family = "llama"


class EvoMistralAffinePreTrainedModel(_EvoAffinePreTrainedModel):
    config_class = EvoMistralAffineConfig
    config: EvoMistralAffineConfig
    _no_split_modules = ("MistralDecoderLayer",)
    _evo_family = "mistral"


class EvoLlamaAffineModel(_EvoAffineModel, EvoLlamaAffinePreTrainedModel):
    pass


class EvoMistralAffineModel(_EvoAffineModel, EvoMistralAffinePreTrainedModel):
    pass


class EvoLlamaAffineForCausalLM(_EvoAffineForCausalLM, EvoLlamaAffinePreTrainedModel):
    _backbone_class = EvoLlamaAffineModel


class EvoMistralAffineForCausalLM(_EvoAffineForCausalLM, EvoMistralAffinePreTrainedModel):
    _backbone_class = EvoMistralAffineModel


class EvoLlamaAffineForSequenceClassification(_EvoAffineForSequenceClassification, EvoLlamaAffinePreTrainedModel):
    _backbone_class = EvoLlamaAffineModel


class EvoMistralAffineForSequenceClassification(
    _EvoAffineForSequenceClassification, EvoMistralAffinePreTrainedModel
):
    _backbone_class = EvoMistralAffineModel
