"""keepkv's KV-cache compression inside a stock Hugging Face ``AutoModelForCausalLM`` (``pip install 'keepkv[hf]'``).

```python
from keepkv.integrations.transformers import KVCompression
with KVCompression(model, method="keepkv", kv_budget=0.2):   # any keepkv method, variant and option
    out = model.generate(**inputs, max_new_tokens=64)
```

Only transformers' public extension points are used:

- a :class:`KeepKVCache` (a ``transformers.Cache``) holding, per layer, keepkv's own fixed-capacity buffers
  (:class:`~keepkv.cache.compressed.CompressedLayerCache`: keys, values, float32 ``log_votes`` = ``ln p``,
  positions, the observation window) driven by keepkv's own cache manager
  (:class:`~keepkv.cache.manager.CacheManager`; the full cache at ``kv_budget=1.0``);
- an attention function registered with ``AttentionInterface`` under the name ``"keepkv"``: it writes the layer's
  new (rotated) keys and values into those buffers, shows the queries to the cache (observation window,
  accumulated attention), and attends with :func:`keepkv.ops.attention.vote_attention` — logits
  ``q·k_i / sqrt(d) + ln p_i`` over the slots visible to each query (position-causal, sliding window, empty slots
  and padding masked). Its mask hook, registered with ``AttentionMaskInterface``, hands the attention the
  ``[batch, T]`` validity of the forward's tokens (left padding) instead of a ``T x kv`` matrix;
- ``model.set_attn_implementation`` to switch the model to ``"keepkv"`` inside the ``with`` block (and back on
  exit, also on an exception), and the ``cache=`` argument of ``generate`` (``model.generate`` is wrapped inside
  the block so that every call gets a fresh :class:`KeepKVCache` sized for its prompt and ``max_new_tokens``).

**One compression schedule for both engines.** The cache manager is keepkv's, so the schedule is the native
engine's (:mod:`keepkv.cache.manager`): before every forward the manager makes room for its tokens (compressing every
layer to the budget when they would not fit), after the prompt's last forward it compresses to the budget and moves
into decode buffers of ``budget + decode_slack`` slots, and decoding compresses back every ``decode_slack`` steps.
Transformers' ``generate`` runs the prompt in one forward unless ``prefill_chunk_size`` is set; with
``KVCompression(..., prefill_chunk_size=N)`` it runs chunks of ``N`` tokens (``generation_config.prefill_chunk_size``)
and the manager sizes its prefill buffers ``budget + N``, exactly as
``keepkv.models.load(..., prefill_chunk_size=N, decode_slack=W, compile=False)`` does. Without it the whole prompt
is one chunk: the native engine does the same when ``prefill_chunk_size >= prompt length``. The default attention
kernel is keepkv's dense reference (``kernel="reference"``, the native engine's ``compile=False`` kernel);
``kernel="flex"`` uses the kernels of ``compile=True`` (compiled FlexAttention for prompt chunks, the packed / SDPA
decode kernel, the compiled compression) without compiling the model's forward: every distinct chunk length and
budget compiles a graph, so it pays off only for long prompts (a tiny 2-layer Llama's first 100-token call took
108 s of compilation on 2 CPU cores, with the same tokens as ``"reference"``).

Supported: the Llama, Mistral, Qwen2 and Qwen3 families (``model.config.model_type`` in
:data:`SUPPORTED_MODEL_TYPES`), greedy or sampled ``generate`` (no beam search: keepkv's caches do not reorder
rows), batches with left padding. keepkv's core never imports transformers; only this module does.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from keepkv.cache.manager import CacheManager
from keepkv.checks import require_int
from keepkv.errors import KeepKVError
from keepkv.models.config import ModelConfig
from keepkv.models.loading import resolve_method
from keepkv.ops.attention import vote_attention

ATTENTION_NAME = "keepkv"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
KERNELS = ("reference", "flex")
DEFAULT_DECODE_SLACK = 64

# The cache whose ``update`` ran last on this thread: a layer's attention module calls ``cache.update`` and then the
# attention function, back to back, and the attention function is not handed the cache (transformers passes it
# only to ``update``); this is how it finds it.
_active = threading.local()


# ---- model checks and shapes --------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a ``*ForCausalLM`` (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise KeepKVError(f"{type(model).__name__} has no model.layers; {_supported_text()}")
    return list(layers)


def _supported_text() -> str:
    return (f"keepkv's transformers integration supports AutoModelForCausalLM models of type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def layer_sliding_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (``None`` = full attention) from a Hugging Face config."""
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if config.model_type == "mistral":
        return [window] * num_layers
    return [None] * num_layers


def check_model(model: Any) -> None:
    """Raise :class:`KeepKVError` unless ``model`` is a causal LM this integration can drive."""
    if not isinstance(model, PreTrainedModel):
        raise KeepKVError(f"KVCompression needs a transformers PreTrainedModel, got {type(model).__name__}; "
                          f"{_supported_text()}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "generate"):
        raise KeepKVError(f"unsupported model {type(model).__name__} (model_type={model_type!r}); "
                          f"{_supported_text()}")
    if not model._can_set_attn_implementation():
        raise KeepKVError(f"{type(model).__name__} does not dispatch attention through AttentionInterface; "
                          f"{_supported_text()}")
    windows = layer_sliding_windows(model.config)
    if len(set(windows)) > 1:
        raise KeepKVError(
            f"{type(model).__name__} mixes sliding-window and full-attention layers ({sorted(set(windows), key=str)}); "
            "keepkv's caches take one attention span per model: all layers full, or all with the same sliding window"
        )
    for layer in decoder_layers(model):
        attention = getattr(layer, "self_attn", None)
        scaling = getattr(attention, "scaling", None)
        head_dim = getattr(attention, "head_dim", None)
        if attention is None or head_dim is None or scaling is None or abs(scaling - head_dim ** -0.5) > 1e-12:
            raise KeepKVError(f"{type(model).__name__}: keepkv's attention needs self_attn with the 1/sqrt(head_dim) "
                              f"scaling of {_supported_text()}")


def model_config(model: Any) -> ModelConfig:
    """The shapes keepkv's cache manager reads (layers, heads, head_dim, context, sliding window) as a
    :class:`ModelConfig`. Qwen3 is labelled ``qwen2``: the manager never reads weights-related flags."""
    c = model.config
    attention = decoder_layers(model)[0].self_attn
    arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen2"}[c.model_type]
    window = layer_sliding_windows(c)[0]
    return ModelConfig(
        arch=arch, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=attention.head_dim, max_position_embeddings=c.max_position_embeddings, sliding_window=window,
    )


class _AttentionLayers(nn.Module):
    """What :meth:`CompressionMethod.bind_model` reads (``attention_layers[l].o_proj.weight``, CriticalKV)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.attention_layers = [layer.self_attn for layer in decoder_layers(model)]


# ---- the cache ------------------------------------------------------------------------------------------------------
class _KeepKVLayer(CacheLayerMixin):
    """Per-layer view transformers' mask code asks for sizes; the buffers live in the parent's manager."""

    is_sliding = False

    def __init__(self, parent: KeepKVCache) -> None:
        super().__init__()
        self.parent = parent
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing: buffers are allocated by the manager at the first forward."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise RuntimeError("KeepKVCache.update is called on the cache, not on its layers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.parent.seen_tokens

    def get_max_length(self) -> int:
        return -1


class KeepKVCache(Cache):
    """A ``transformers.Cache`` whose layers are keepkv's fixed-capacity buffers, driven by keepkv's cache manager.

    ``get_seq_length()`` is the number of tokens the model has *seen* (padding included, what transformers uses
    for positions and input slicing); the entries actually kept are in :meth:`entries_per_head`. Only the
    ``"keepkv"`` attention function reads and writes it (``update`` hands the new keys and values over to it).

    Args:
        model: the Hugging Face causal LM (checked by :func:`check_model`).
        method: ``None`` for the full cache, else a keepkv method name (``make_method``), ``method_options`` its
            options; ``kv_budget``: a fraction in (0, 1] of the prompt or an integer number of entries per KV head.
        max_new_tokens: tokens the generation may add after the prompt (sizes the decode buffers).
        prompt_tokens / row_prompt_tokens: the prompt's padded width and each row's real length, if known (else
            the first forward is taken as the whole prompt).
        prefill_chunk_size: tokens per prefill forward (``None``: the whole prompt in one forward).
        decode_slack: ``W``, decode steps between two compressions; ``kernel``: ``"reference"`` or ``"flex"``.
    """

    def __init__(
        self, model: nn.Module, method: str | None, kv_budget: float | int | None, *, max_new_tokens: int,
        prompt_tokens: int | None = None, row_prompt_tokens: list[int] | None = None,
        prefill_chunk_size: int | None = None, decode_slack: int = DEFAULT_DECODE_SLACK, kernel: str = "reference",
        **method_options: Any,
    ) -> None:
        check_model(model)
        require_int(max_new_tokens, "max_new_tokens", 0)
        if kernel not in KERNELS:
            raise KeepKVError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        self.config = model_config(model)
        super().__init__(layers=[_KeepKVLayer(self) for _ in range(self.config.num_layers)])
        name, method_object = resolve_method(method, kv_budget, dict(method_options))
        self.method_name, self.kv_budget, self.kernel = name, kv_budget, kernel
        weight = model.get_input_embeddings().weight
        dtype, device = weight.dtype, weight.device
        self.manager = CacheManager(self.config, dtype, device, method_object, kv_budget, decode_slack,
                                    compiled_ops=kernel == "flex")
        self.manager.bind_network(_AttentionLayers(model))
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens, self.row_prompt_tokens = prompt_tokens, row_prompt_tokens
        self.prefill_chunk_size = prefill_chunk_size
        self.seen_tokens = 0
        self.phase = "empty"  # -> "prefill" -> "decode"
        self._pending: tuple[int, Tensor, Tensor] | None = None

    # ---- transformers' Cache interface --------------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Hand the layer's new rotated keys/values to the ``"keepkv"`` attention function (which writes them into
        the layer's buffers with their positions and padding). Returns them unchanged."""
        self._pending = (layer_idx, key_states, value_states)
        _active.cache = self
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def _refuse(self, what: str) -> None:
        raise KeepKVError(f"a keepkv compressed cache cannot {what} (beam search, assisted decoding and cache "
                          "cropping are not supported; use greedy or sampled generate)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._refuse("reorder its rows")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("repeat its rows")

    def batch_select_indices(self, indices: Tensor) -> None:
        self._refuse("select rows")

    def reset(self) -> None:
        """Forget everything; the next forward starts a new prompt."""
        self.seen_tokens, self.phase, self._pending = 0, "empty", None

    # ---- keepkv ----------------------------------------------------------------------------------------------------
    @property
    def layer_caches(self) -> list:
        """keepkv's per-layer buffers (:class:`~keepkv.cache.kv_cache.LayerKVCache`)."""
        return self.manager.caches

    def entries_per_head(self) -> Tensor:
        """``[layers, batch, kv_heads]`` live entries (reads the device)."""
        return self.manager.entries_per_head()

    @property
    def compressions(self) -> int:
        return self.manager.compressions

    def _begin_forward(self, valid: Tensor) -> None:
        """Layer 0 of a forward: allocate (first forward), end the prefill (first forward after the prompt), then
        make room for this forward's tokens — the native engine's schedule (:mod:`keepkv.cache.manager`)."""
        batch, tokens = valid.shape
        if self.phase == "empty":
            width = self.prompt_tokens if self.prompt_tokens is not None else tokens
            rows = self.row_prompt_tokens
            if rows is None and batch > 1:
                rows = valid.sum(dim=1).tolist()
            chunk = self.prefill_chunk_size if self.prefill_chunk_size is not None else width
            self.prompt_tokens = width
            self.manager.allocate(batch, width, self.max_new_tokens, chunk, width, row_prompt_tokens=rows)
            self.phase = "prefill"
        elif self.phase == "prefill" and self.seen_tokens >= self.prompt_tokens:
            self.manager.end_prefill()
            self.phase = "decode"
        self.manager.make_room(tokens)

    def attend(self, layer: int, query: Tensor, valid: Tensor, positions: Tensor) -> Tensor:
        """Write this layer's pending keys/values, show the queries to the cache, and return vote-weighted attention
        ``[batch, heads, T, head_dim]`` over the layer's buffers."""
        if self._pending is None or self._pending[0] != layer:
            raise RuntimeError(f"keepkv attention at layer {layer} without that layer's cache.update")
        _, keys, values = self._pending
        self._pending = None
        _active.cache = None
        with torch.inference_mode():  # the manager's buffers may be inference tensors (it compresses in that mode)
            if layer == 0:
                self._begin_forward(valid)
            cache = self.manager.caches[layer]
            cache.write(keys, values, positions, valid)
            cache.observe_queries(query, positions, valid)
            out = vote_attention(query, cache.keys, cache.values, cache.log_votes, cache.positions, positions,
                                 self.config.sliding_window, kernel="flex" if self.kernel == "flex" else "reference")
            if layer == self.config.num_layers - 1:
                self.manager.wrote(query.shape[2])
                self.seen_tokens += query.shape[2]
        return out.clone()  # a normal tensor again: the caller's autograd mode may save it


# ---- the attention function and its mask hook --------------------------------------------------------------------
def keepkv_mask(*, q_length: int, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """The ``"keepkv"`` mask hook: ``[batch, q_length]`` bool validity of the forward's tokens (``None`` when the
    caller gave no padding mask). Visibility (causal order, sliding window, empty slots) comes from the cache's
    positions, so no ``T x kv`` matrix is built."""
    if attention_mask is None:
        return None
    return attention_mask[:, -q_length:].to(torch.bool)


def keepkv_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """The ``"keepkv"`` attention function: ``softmax(q·k_i / sqrt(d) + ln p_i)`` over the layer's compressed
    cache (see the module docstring). Returns ``([batch, T, heads, head_dim], None)`` as transformers expects."""
    cache = getattr(_active, "cache", None)
    layer = getattr(module, "layer_idx", None)
    if cache is None or cache._pending is None or cache._pending[0] != layer or cache._pending[1] is not key:
        raise KeepKVError(
            "the 'keepkv' attention needs a KeepKVCache: inside KVCompression call model.generate(...) (it makes "
            "one), or pass cache=compression.new_cache(...) with use_cache=True to a forward"
        )
    batch, _, q_len, _ = query.shape
    if attention_mask is None:
        valid = torch.ones(batch, q_len, dtype=torch.bool, device=query.device)
    elif attention_mask.dim() == 2 and attention_mask.shape == (batch, q_len):
        valid = attention_mask.to(torch.bool)
    else:
        raise KeepKVError(f"the 'keepkv' attention takes a 2D padding mask, got shape {tuple(attention_mask.shape)} "
                          "(a custom 4D mask cannot be mapped onto compressed slots)")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(cache.seen_tokens, cache.seen_tokens + q_len, device=query.device)[None]
    positions = torch.where(valid, position_ids.expand(batch, q_len), 0)  # padding at position 0, as keepkv does
    out = cache.attend(layer, query, valid, positions)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the ``"keepkv"`` attention function and mask hook with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, keepkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, keepkv_mask)


# ---- the public context manager -------------------------------------------------------------------------------------
class KVCompression:
    """Run ``model`` with keepkv's compressed KV cache inside a ``with`` block.

    ``method``/``kv_budget``/``method_options`` mean what they mean for :func:`keepkv.models.load` (a budget
    without a method is KeepKV; ``kv_budget=1.0`` or ``None`` is the full cache, still through keepkv's buffers and
    attention). ``prefill_chunk_size``: prompt tokens per prefill forward (``None``: one forward);
    ``decode_slack``: decode steps between compressions (``W``, default 64); ``kernel``: ``"reference"`` (dense,
    eager) or ``"flex"`` (compiled kernels). Every argument is checked when the object is made.

    Inside the block ``model.generate`` builds a :class:`KeepKVCache` for each call (the last one is
    ``self.last_cache``: ``entries_per_head()``, ``compressions``); other forwards need
    ``cache=self.new_cache(...)``. On exit the model's attention implementation and ``generate`` are restored.
    """

    def __init__(self, model: Any, method: str | None = None, kv_budget: float | int | None = None, *,
                 prefill_chunk_size: int | None = None, decode_slack: int | None = None, kernel: str = "reference",
                 **method_options: Any) -> None:
        check_model(model)
        resolve_method(method, kv_budget, dict(method_options))  # raises on a bad method, option or budget
        require_int(prefill_chunk_size, "prefill_chunk_size", 1, allow_none=True)
        require_int(decode_slack, "decode_slack", 1, allow_none=True)
        if kernel not in KERNELS:
            raise KeepKVError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        self.model, self.method, self.kv_budget = model, method, kv_budget
        self.prefill_chunk_size = prefill_chunk_size
        self.decode_slack = DEFAULT_DECODE_SLACK if decode_slack is None else decode_slack
        self.kernel, self.method_options = kernel, dict(method_options)
        self.last_cache: KeepKVCache | None = None
        self._saved: tuple[str, Any] | None = None

    def new_cache(self, max_new_tokens: int, prompt_tokens: int | None = None,
                  row_prompt_tokens: list[int] | None = None) -> KeepKVCache:
        """A fresh :class:`KeepKVCache` for one prompt (see its arguments)."""
        cache = KeepKVCache(
            self.model, self.method, self.kv_budget, max_new_tokens=max_new_tokens, prompt_tokens=prompt_tokens,
            row_prompt_tokens=row_prompt_tokens, prefill_chunk_size=self.prefill_chunk_size,
            decode_slack=self.decode_slack, kernel=self.kernel, **self.method_options,
        )
        self.last_cache = cache
        return cache

    def __enter__(self) -> KVCompression:
        if self._saved is not None:
            raise KeepKVError("this KVCompression is already active (it cannot be entered twice)")
        current = self.model.config._attn_implementation
        if current == ATTENTION_NAME:
            raise KeepKVError("the model already runs keepkv's attention (nested KVCompression blocks are not "
                              "supported)")
        register()
        instance_generate = self.model.__dict__.get("generate")
        self.model.set_attn_implementation(ATTENTION_NAME)
        self._saved = (current, instance_generate)
        self.model.generate = self._generate
        return self

    def __exit__(self, *exc_info: Any) -> None:
        current, instance_generate = self._saved
        self._saved = None
        if instance_generate is None:
            self.model.__dict__.pop("generate", None)
        else:
            self.model.generate = instance_generate
        self.model.set_attn_implementation(current)

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with a fresh :class:`KeepKVCache` (and ``prefill_chunk_size``) passed in."""
        original = self._saved[1] or type(self.model).generate.__get__(self.model)
        for name in ("cache", "past_key_values"):
            given = kwargs.get(name)
            if given is not None and not isinstance(given, KeepKVCache):
                raise KeepKVError(f"inside KVCompression, generate makes its own cache: drop {name}= (got "
                                  f"{type(given).__name__}) or pass a KeepKVCache from new_cache()")
            if isinstance(given, KeepKVCache):
                return original(*args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise KeepKVError("inside KVCompression, generate needs input_ids as a [batch, length] tensor")
        config = kwargs.get("generation_config") or self.model.generation_config
        if int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1) > 1:
            raise KeepKVError("beam search is not supported with a keepkv compressed cache (num_beams must be 1)")
        width = input_ids.shape[1]
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if max_new is None:
            max_new = int(kwargs.get("max_length", config.max_length)) - width
        mask = kwargs.get("attention_mask")
        rows = mask.sum(dim=1).tolist() if mask is not None and input_ids.shape[0] > 1 else None
        cache = self.new_cache(max(int(max_new), 0), prompt_tokens=width, row_prompt_tokens=rows)
        if self.prefill_chunk_size is not None:
            kwargs["prefill_chunk_size"] = self.prefill_chunk_size
        kwargs.pop("use_cache", None)
        return original(*args, cache=cache, use_cache=True, **kwargs)
