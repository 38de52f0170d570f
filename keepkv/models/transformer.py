"""The one decoder behind Llama, Mistral and Qwen2 (gpt-fast style: one readable, compile-friendly file).

``x -> embed -> N x [x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x))] -> RMSNorm -> lm_head``, with
- RMSNorm (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``, statistics in float32;
- rotary position embedding (Su et al. 2021), rotate-half layout, optional ``linear`` / ``llama3`` frequency
  scaling (Llama-3.1 ``rope_scaling``);
- grouped-query attention (Ainslie et al. 2023) over a :class:`~keepkv.cache.LayerKVCache`, through
  :func:`keepkv.ops.attention.vote_attention` (FlexAttention + vote ``score_mod``); optional q/k/v bias (Qwen2)
  and sliding window (Mistral);
- SwiGLU MLP: ``down(silu(gate(x)) * up(x))``;
- projections through :class:`keepkv.ops.linear.Linear` (``nn.Linear`` with a compiled-decode GEMV form for
  one-row products).

Parameter names are exactly Hugging Face's (``model.layers.0.self_attn.q_proj.weight`` ...), so a safetensors
checkpoint loads without renaming. The only state besides weights is each attention layer's ``kv_cache``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keepkv.cache import LayerKVCache
from keepkv.compile_limits import repeated_region
from keepkv.models.config import ModelConfig
from keepkv.ops.attention import vote_attention, vote_attention_chunk
from keepkv.ops.linear import Linear, linear_into
from keepkv.ops.workspace import Workspace
from keepkv.runtime import DEFAULT_RUNTIME, RuntimeOptions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """``inv_freq_j = theta^(-2j/d)``, rescaled per ``config.rope_scaling`` (float32, ``[head_dim // 2]``).

    ``linear``: ``inv_freq / factor``. ``llama3`` (Llama-3.1): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
    ``... / high_freq_factor`` kept, and the band between interpolated smoothly.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original_context = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original_context / low, inv_freq / factor, inv_freq)
        smooth = (original_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelength >= original_context / high) & (wavelength <= original_context / low)
        return torch.where(in_band, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``[batch, 1, T, head_dim]`` for integer ``positions [batch, T]``."""
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: ``x * cos + rotate_half(x) * sin``, ``rotate_half([a, b]) = [-b, a]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.kv_cache: LayerKVCache | None = None
        self.kernel = "flex"
        self.runtime: RuntimeOptions = DEFAULT_RUNTIME  # kernel choices, set once per model (set_runtime_options)
        # host-side count of the slots written before the current prefill chunk, set by the engine when the
        # chunk may take the split prefill kernel (keepkv.ops.attention.vote_attention_chunk); None otherwise
        self.prefill_past_slots: int | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        batch, q_len, _ = x.shape
        q = self.q_proj(x).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("no KV cache attached: call Transformer.attach_caches() before forward()")
        cache.write(k, v, positions, valid)
        cache.observe_queries(q, positions, valid)  # may compress in place (oracle mode) before we attend
        past = self.prefill_past_slots if q_len > 1 else None
        if past is not None:  # the chunk's own keys (causal) and the slots before it, merged
            keys_new, values_new = k.to(cache.keys.dtype), v.to(cache.values.dtype)
            out = vote_attention_chunk(
                q, keys_new, values_new, cache.keys[:, :, :past], cache.values[:, :, :past],
                cache.log_votes[:, :, :past],
            )
        else:
            out = vote_attention(
                q, cache.keys, cache.values, cache.log_votes, cache.positions, positions, self.sliding_window,
                kernel=self.kernel, runtime=self.runtime,
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))


def _plain_projection(module: nn.Module) -> bool:
    """Whether calling ``module`` is exactly ``linear(x, weight, bias)``: a :class:`Linear` (not a subclass), its
    ``forward`` not replaced on the instance, with no forward hooks or pre-hooks of its own and none registered
    globally."""
    return (type(module) is Linear and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        # scratch buffers of the current eager prefill (Transformer.scratch_buffers), None otherwise
        self.workspace: Workspace | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``down(silu(gate(x)) * up(x))``. In an eager forward under ``torch.inference_mode`` while the network
        lends its layers a :class:`~keepkv.ops.workspace.Workspace` (prefill chunks), ``gate(x)`` and ``up(x)``
        are written into its two buffers, shared by every layer and chunk, and the SwiGLU runs in place
        (``silu_``, ``mul_``): the same GEMMs and values, no fresh ``[tokens, intermediate]`` tensors. The
        buffers are written by ``torch.mm``, not through ``gate_proj`` / ``up_proj``'s ``__call__``, so that path
        is taken only for plain :class:`~keepkv.ops.linear.Linear` projections without hooks. Compiled graphs
        (decode) and every other call take the plain form, which inductor fuses."""
        workspace = self.workspace
        if (workspace is None or not torch.is_inference_mode_enabled() or torch.compiler.is_compiling()
                or not (_plain_projection(self.gate_proj) and _plain_projection(self.up_proj))):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        rows = x.shape[:-1].numel()
        flat = x.reshape(rows, x.shape[-1])
        gate_proj, up_proj = self.gate_proj, self.up_proj
        gate = linear_into(flat, gate_proj.weight, gate_proj.bias,
                           workspace.buffer("mlp_gate", (rows, gate_proj.weight.shape[0]), x.dtype, x.device))
        up = linear_into(flat, up_proj.weight, up_proj.bias,
                         workspace.buffer("mlp_up", (rows, up_proj.weight.shape[0]), x.dtype, x.device))
        return self.down_proj(F.silu(gate, inplace=True).mul_(up)).view(*x.shape[:-1], -1)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    @repeated_region  # compiled once, stamped out for every layer (see keepkv.compile_limits.repeated_region)
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, valid)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, blocks and final norm: Hugging Face's ``model.*`` sub-module."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` returns final hidden states; :meth:`project` turns them into logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.runtime: RuntimeOptions = DEFAULT_RUNTIME  # the attention layers' options (set_runtime_options)

    @property
    def attention_layers(self) -> list[Attention]:
        return [block.self_attn for block in self.model.layers]

    def attach_caches(self, caches: list[LayerKVCache]) -> None:
        """Give each attention layer its cache (one per layer, in order)."""
        if len(caches) != self.config.num_layers:
            raise ValueError(f"need {self.config.num_layers} layer caches, got {len(caches)}")
        for attention, cache in zip(self.attention_layers, caches):
            attention.kv_cache = cache

    def set_attention_kernel(self, kernel: str) -> None:
        for attention in self.attention_layers:
            attention.kernel = kernel

    def set_runtime_options(self, runtime: RuntimeOptions) -> None:
        """The :class:`~keepkv.runtime.RuntimeOptions` every attention layer runs with (read at trace time)."""
        self.runtime = runtime
        for attention in self.attention_layers:
            attention.runtime = runtime
        for module in self.modules():
            if isinstance(module, Linear):
                module.reduction_dtypes = runtime.reduction_dtypes

    def set_prefill_past_slots(self, past_slots: list[int] | None) -> None:
        """Per layer, the slots written before the next prefill chunk (host integers), which routes the chunk
        through the split prefill kernel (:func:`keepkv.ops.attention.vote_attention_chunk`, whose
        preconditions the caller has checked); ``None`` restores the general kernel."""
        for layer, attention in enumerate(self.attention_layers):
            attention.prefill_past_slots = None if past_slots is None else past_slots[layer]

    @contextmanager
    def scratch_buffers(self) -> Iterator[Workspace]:
        """Within the block, every MLP computes its eager ``torch.inference_mode`` forwards in one shared
        :class:`~keepkv.ops.workspace.Workspace` (``MLP.forward``); on exit the buffers are freed. The engine
        opens one per prefill (and per ``extend`` / ``teacher_forced_logits``) around its chunk loop. Nested: the
        outer workspace stays in use."""
        mlps = [block.mlp for block in self.model.layers]
        if mlps[0].workspace is not None:
            yield mlps[0].workspace
            return
        workspace = Workspace()
        for mlp in mlps:
            mlp.workspace = workspace
        try:
            yield workspace
        finally:
            for mlp in mlps:
                mlp.workspace = None
            workspace.clear()

    def forward(self, input_ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """Hidden states ``[batch, T, hidden]`` after the final norm.

        Args:
            input_ids: ``[batch, T]`` token ids (any id for padding).
            positions: ``[batch, T]`` token positions (RoPE and causal visibility).
            valid: ``[batch, T]`` bool, False marks padding.
        Writes the T new keys/values of every layer into its cache.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, positions, valid)
        return self.model.norm(x)

    def project(self, hidden: Tensor) -> Tensor:
        """Logits in float32 for hidden states of any leading shape."""
        return self.lm_head(hidden).float()


def build_transformer(config: ModelConfig, state_dict: dict[str, Tensor], device: torch.device) -> Transformer:
    """A :class:`Transformer` whose parameters *are* the given tensors (no random init, no extra copy).

    The module is built on the meta device and the checkpoint tensors are assigned in; ``strict`` loading means a
    missing or unexpected name is an error. Tied embeddings are re-tied after assignment.
    """
    with torch.device("meta"):
        network = Transformer(config)
    state = dict(state_dict)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    network.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        network.lm_head.weight = network.model.embed_tokens.weight
    network.inv_freq = rope_inverse_frequencies(config).to(device)
    return network.eval().requires_grad_(False)
