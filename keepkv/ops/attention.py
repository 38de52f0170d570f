"""Vote-weighted attention: ``softmax(q·k_i / sqrt(d) + ln p_i)`` over a fixed-capacity cache.

KeepKV (Tian et al., arXiv 2504.09936, §3 "electoral votes") gives every cache entry a vote count ``p_i``; the
attention output becomes ``o = sum_i p_i s_i v_i / sum_i p_i s_i`` with ``s_i = exp(q·k_i/sqrt(d))``, i.e. an
additive per-key logit bias ``ln p_i``. keepkv keeps ``log_votes = ln p`` (float32) in the cache: 0 for an
ordinary entry, ``-inf`` for an empty slot.

Visibility is decided from token *positions*, not slot indices, so one rule serves prefill chunks, decode steps,
padding and compressed caches whose slots are no longer in position order:
``visible(q, i) = pos_i <= pos_q  and  pos_q - pos_i < sliding_window``.

Three kernels compute the same thing:
- ``flex``: ``torch.nn.attention.flex_attention`` with the ``score_mod`` adding ``ln p`` and a block mask
  computed from the positions (:mod:`keepkv.ops.flex_mods`: tiles every query sees whole skip the ``mask_mod``,
  tiles nobody sees are skipped), run through ``torch.compile`` (a fused kernel;
  the eager flex path materialises the score matrix). For the dtypes in ``RuntimeOptions.vote_column_dtypes``
  (16-bit by default) ``ln p`` enters through two extra key columns instead (:func:`votes_as_key_columns`).
- ``reference``: a dense eager implementation (float32 softmax) used by tests and by eager runs.
- ``packed`` and ``sdpa``: the decode (``q_len == 1``) paths of the ``flex`` kernel, chosen per dtype, cache
  size and CPU by :func:`decode_kernel_for` (flex's template is built for long query blocks, not one query row).
  ``packed`` folds the ``G`` query heads of a KV head into one ``[G, D]`` query block (no K/V repeat),
  ``softmax(Q K^T / sqrt(d) + ln p)`` in float32 then ``@ V``, over :func:`decode_pieces` pieces of the cache;
  ``sdpa`` is ``scaled_dot_product_attention`` with the equivalent additive bias (``ln p`` where visible, else
  ``-inf``) built at ``[B, H, T, C]``. Same maths as ``flex``.
- ``split``: the prefill-chunk path of a compiled engine on CPU (:func:`prefill_kernel_for`,
  :func:`vote_attention_chunk`): the chunk's own keys under a causal mask and the older slots with ``+ ln p``, two
  fused flash attentions merged by their log-sum-exps; the engine uses it only where its preconditions hold.
A query row with nothing visible (a padding token's row) yields zeros in every kernel, never NaN.

Which kernel runs is a :class:`keepkv.runtime.RuntimeOptions` choice (``runtime=``; the defaults when omitted),
read when a graph is traced. The measurements behind the defaults: ``docs/profile.md``, "Measurements behind the
code's choices".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from keepkv.compile_limits import allow_graph_per_shape
from keepkv.ops.flex_mods import FLEX_BLOCK_SIZE, generate_vote_score_mod, visible, vote_block_mask
from keepkv.ops.scores import compute_dtype, head_logits
from keepkv.runtime import DECODE_KERNELS, DEFAULT_RUNTIME, PREFILL_KERNELS, RuntimeOptions  # noqa: F401 (re-exported)

ATTENTION_KERNELS = ("flex", "reference")


def _cpu_has_amx() -> bool:
    """Whether this process's CPU has AMX tiles (Intel Sapphire Rapids and later), as torch reports it; ``False``
    when torch cannot tell."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


CPU_HAS_AMX = _cpu_has_amx()
"""Read once at import: a plain constant when a graph is traced (:func:`decode_kernel_for`)."""


def decode_kernel_for(dtype: torch.dtype, capacity: int, runtime: RuntimeOptions = DEFAULT_RUNTIME, *,
                      device: torch.device | str) -> str:
    """The kernel of one-token queries over ``capacity`` slots in ``dtype`` on ``device``: ``runtime.decode_kernel``,
    or for ``"auto"``: ``"sdpa"`` for float16 / bfloat16 up to ``runtime.sdpa_decode_max_slots`` slots, else
    ``"packed"``. On a CPU, SDPA is chosen only where it was measured faster: with AMX tiles (Intel Xeon with AMX,
    SDPA's kernel splits its work by query head and keeps the threads busy on small 16-bit caches; past a few
    thousand slots ``packed``, which reads each KV head once for its whole group, is faster). On a CPU without
    them (AMD EPYC) ``packed`` was 3-6x faster than SDPA at 884-3341 bfloat16 slots (``docs/profile.md``, section
    13), so it always takes ``packed``."""
    if runtime.decode_kernel != "auto":
        return runtime.decode_kernel
    if dtype not in (torch.float16, torch.bfloat16) or capacity > runtime.sdpa_decode_max_slots:
        return "packed"
    if torch.device(device).type == "cpu" and not CPU_HAS_AMX:
        return "packed"
    return "sdpa"


def votes_as_key_columns(q: Tensor, keys: Tensor, log_votes: Tensor) -> tuple[Tensor, Tensor]:
    """``(q', k')`` with ``q'·k' = q·k + sqrt(d) ln p``, so ``softmax(q'·k' / sqrt(d))`` is the vote attention
    with no ``score_mod`` at all (FlexAttention's CPU template then has no per-score gather to do).

    ``q' = [q, 1, 1, 0 ...]``, ``k' = [k, hi, lo, 0 ...]`` with ``hi = round(sqrt(d) ln p)`` and
    ``lo = round(sqrt(d) ln p - hi)`` in the key dtype (``lo = 0`` for an empty slot, whose ``hi = -inf``), so
    ``ln p`` survives 16-bit keys to about 2^-16 of its size; the width is padded with zeros to a multiple of 16.
    The products are accumulated in float32 by the kernel. Costs one copy of the keys per prefill chunk.
    """
    head_dim = q.shape[-1]
    width = -(-(head_dim + 2) // 16) * 16
    scaled = log_votes * math.sqrt(head_dim)  # float32
    hi = scaled.to(keys.dtype)
    lo = torch.where(torch.isfinite(scaled), scaled - hi.float(), 0.0).to(keys.dtype)
    vote_columns = F.pad(torch.stack((hi, lo), dim=-1), (0, width - head_dim - 2))
    query_columns = F.pad(q.new_ones(*q.shape[:-1], 2), (0, width - head_dim - 2))
    return torch.cat((q, query_columns), dim=-1), torch.cat((keys, vote_columns), dim=-1)


def _flex_with_vote_block_mask(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None, block_size: tuple[int, int], vote_columns: bool,
) -> Tensor:
    group_size = q.shape[1] // keys.shape[1]
    block_mask = vote_block_mask(log_votes, kv_positions, q_positions, q.shape[1], sliding_window, block_size)
    if vote_columns:
        q_votes, keys_votes = votes_as_key_columns(q, keys, log_votes)
        return flex_attention(q_votes, keys_votes, values, block_mask=block_mask, scale=1.0 / math.sqrt(q.shape[-1]),
                              enable_gqa=group_size > 1)
    score_mod = generate_vote_score_mod(log_votes, group_size)
    return flex_attention(q, keys, values, score_mod=score_mod, block_mask=block_mask, enable_gqa=group_size > 1)


# One graph builds the block mask and runs the fused flex kernel. ``assert_indirect_indexing`` off: the
# ``score_mod`` / ``mask_mod`` reads are indexed by the template's own ``b, h // G, q_idx, kv_idx`` (in range by
# construction), so the per-score bounds check is pure cost.
_compiled_flex_attention = torch.compile(
    _flex_with_vote_block_mask, dynamic=False, fullgraph=True, options={"assert_indirect_indexing": False}
)
_limits_raised = False  # dynamo's recompile limits are raised once, at the first flex call (one graph per shape)


def vote_attention_flex(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None, block_size: tuple[int, int] = FLEX_BLOCK_SIZE,
    runtime: RuntimeOptions = DEFAULT_RUNTIME,
) -> Tensor:
    """Compiled FlexAttention: the vote ``score_mod`` (``+ ln p``; for query chunks in
    ``runtime.vote_column_dtypes`` the same sum carried by two extra key columns, :func:`votes_as_key_columns`)
    and the data-dependent :func:`vote_block_mask` (visibility), built and run in one compiled graph.

    Shapes: ``q [B, H, T, D]``, ``keys/values [B, H_kv, C, D]`` (same dtype as ``q``), ``log_votes`` and
    ``kv_positions [B, H_kv, C]``, ``q_positions [B, T]``; ``block_size`` the tile (query rows, slots).
    Returns ``[B, H, T, D]`` in ``q.dtype``.
    """
    global _limits_raised
    if not _limits_raised:
        allow_graph_per_shape(runtime.graphs_per_function)
        _limits_raised = True
    vote_columns = q.dtype in runtime.vote_column_dtypes and q.shape[2] > 1  # one-row queries keep the score_mod
    return _compiled_flex_attention(
        q, keys, values, log_votes, kv_positions, q_positions, sliding_window, tuple(block_size), vote_columns
    )


_MIN_PIECE = 128  # pieces shorter than this buy nothing


def decode_pieces(capacity: int, most: int = DEFAULT_RUNTIME.decode_pieces) -> int:
    """The most pieces ``p <= most`` that divide ``capacity`` into pieces of at least ``_MIN_PIECE`` slots.

    More pieces give the packed kernel's matrix products ``kv_heads x pieces`` independent batch items instead of
    ``kv_heads`` (a few KV heads leave threads idle); only a divisor of the capacity is used (full caches come in
    multiples of ``RuntimeOptions.capacity_quantum``), since a separate tail piece costs two more small products."""
    for pieces in range(most, 1, -1):
        if capacity % pieces == 0 and capacity // pieces >= _MIN_PIECE:
            return pieces
    return 1


def vote_attention_packed(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None, most_pieces: int = DEFAULT_RUNTIME.decode_pieces,
) -> Tensor:
    """Grouped ("packed") vote attention for short query blocks: the decode path (same arguments and result as
    :func:`vote_attention_flex`).

    ``Q_g [B, H_kv, G*T, D]`` (the group's query heads stacked, K/V never repeated); logits
    ``Q_g K^T / sqrt(d)`` in the input dtype, then ``+ ln p``, visibility mask, softmax in float32 and ``@ V``
    in the input dtype. The ``C`` slots are viewed (no copy) as ``decode_pieces(C, most_pieces)`` equal pieces;
    one softmax spans them all (shared row max and denominator) and the pieces' ``@ V`` partial sums are added in
    float32.
    Its score matrix is ``[B, H, T, C]``: meant for ``T = 1`` (or a few tokens).
    """
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    group_size = num_heads // kv_heads
    pieces = decode_pieces(capacity, most_pieces)
    piece = capacity // pieces
    q_grouped = q.reshape(batch, kv_heads, 1, group_size * q_len, head_dim)
    keys, values = (t.view(batch, kv_heads, pieces, piece, head_dim) for t in (keys, values))
    log_votes, kv_positions = (t.view(batch, kv_heads, pieces, 1, piece) for t in (log_votes, kv_positions))
    logits = torch.matmul(q_grouped, keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(head_dim))
    q_pos = q_positions.repeat(1, group_size)[:, None, None, :, None]  # row (g, t) of the group -> pos_t
    # [B, H_kv, pieces, G*T, piece]: ln p where visible, -inf elsewhere
    logits = torch.where(visible(kv_positions, q_pos, sliding_window), logits + log_votes, -float("inf"))
    row_max = logits.amax(dim=(2, 4), keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, 0.0))
    weights = weights / weights.sum(dim=(2, 4), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.matmul(weights.to(values.dtype), values).float().sum(dim=2)  # [B, H_kv, G*T, D]
    return out.to(q.dtype).view(batch, num_heads, q_len, head_dim)


def vote_attention_sdpa(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """``scaled_dot_product_attention`` with the additive bias ``ln p`` (visible) / ``-inf`` (not): a decode path
    (same arguments and result as :func:`vote_attention_flex`).

    The bias is built per KV head at ``[B, H_kv, T, C]`` in float32 (``ln p`` exact, as in the other kernels;
    SDPA takes a float mask beside a 16-bit query) and repeated to the ``H`` query heads; ``enable_gqa`` shares
    K/V, never copies them. Its score matrix is ``[B, H, T, C]``: meant for ``T = 1``. A row that sees nothing is
    0, which is SDPA's own rule for a fully masked row since torch 2.5 (pytorch/pytorch#131060, #133882; on CPU
    tested), so no NaN guard is added on the output (it would cost a large share of a 16-bit decode step).
    """
    group_size = q.shape[1] // keys.shape[1]
    bias = additive_vote_bias(log_votes, kv_positions, q_positions, group_size, sliding_window)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=group_size > 1)


def additive_vote_bias(
    log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor, group_size: int, sliding_window: int | None = None,
) -> Tensor:
    """``[B, H, T, C]`` float32: ``ln p_i`` where query ``t`` sees slot ``i`` (:func:`visible`), else ``-inf``;
    built per KV head and repeated to its ``group_size`` query heads."""
    seen = visible(kv_positions[:, :, None, :], q_positions[:, None, :, None], sliding_window)  # [B, H_kv, T, C]
    bias = torch.where(seen, log_votes[:, :, None, :], -float("inf"))
    return bias.repeat_interleave(group_size, dim=1) if group_size > 1 else bias


REFERENCE_QUERY_BLOCK = 512
"""Most query rows one dense eager attention call takes (:func:`vote_attention` with ``kernel="reference"``): a
longer eager prefill chunk is attended in blocks of this many queries, so its ``[B, H, T, C]`` float32 logits stay
those of an ordinary 512-token chunk."""


def vote_attention_reference(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """Dense eager reference of :func:`vote_attention_flex` (same arguments, same result).

    Logits, bias and softmax in float32 (float64 if ``q`` is float64); a row with no visible entry gives 0.
    """
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads = keys.shape[1]
    group_size = num_heads // kv_heads
    dtype = compute_dtype(q)
    logits = head_logits(q.to(dtype).reshape(batch, kv_heads, group_size, q_len, head_dim), keys.to(dtype))
    q_pos = q_positions[:, None, None, :, None]
    kv_pos = kv_positions[:, :, None, None, :]
    # the bias (ln p where visible, -inf elsewhere) is built at [B, H_kv, 1, T, C] and added in place: eager
    # prefill chunks are dominated by passes over the [B, H_kv, G, T, C] logits, so they are kept few
    bias = log_votes[:, :, None, None, :].to(dtype).masked_fill(
        ~visible(kv_pos, q_pos, sliding_window), -float("inf"))
    logits.add_(bias)
    weights = torch.softmax(logits, dim=-1)
    has_entries = torch.isfinite(bias).any(dim=-1, keepdim=True)  # a visible, non-empty slot
    weights = weights.masked_fill_(~has_entries, 0.0)  # a row without one is NaN after softmax: 0
    weights = weights.reshape(batch, kv_heads, group_size * q_len, -1)
    out = torch.matmul(weights, values.to(dtype))
    return out.reshape(batch, num_heads, q_len, head_dim).to(q.dtype)


def prefill_kernel_for(device: torch.device, runtime: RuntimeOptions = DEFAULT_RUNTIME) -> str:
    """The kernel of a compiled model's prefill chunks on ``device``: ``runtime.prefill_kernel``, or for
    ``"auto"``: ``"split"`` (:func:`vote_attention_chunk`) where torch has a fused attention returning its
    log-sum-exp (the CPU flash kernel), else ``"flex"`` (:func:`vote_attention_flex`). The engine offers a chunk
    to ``"split"`` only when its preconditions hold; any other chunk takes ``"flex"``."""
    kernel = runtime.prefill_kernel
    if kernel == "auto":
        return "split" if torch.device(device).type == "cpu" else "flex"
    if kernel == "split" and torch.device(device).type != "cpu":
        raise ValueError(f"prefill_kernel='split' needs an attention returning its log-sum-exp, which torch has on "
                         f"the CPU only; on {torch.device(device).type} use 'auto' or 'flex'")
    return kernel


def _attention_with_lse(q: Tensor, keys: Tensor, values: Tensor, causal: bool, bias: Tensor | None
                        ) -> tuple[Tensor, Tensor]:
    """Fused (flash) attention returning ``(out [B, H, T, D], logsumexp [B, H, T] float32)``; K/V may have fewer
    heads than ``q`` (grouped). The CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, 0.0, causal,
                                                                          attn_mask=bias)
    return out, lse


def _merge_two(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax over the union of two disjoint key sets from the two partial results:
    ``(e^{l_a} o_a + e^{l_b} o_b) / (e^{l_a} + e^{l_b})``, in float32; a part whose row saw nothing
    (``l = -inf``) weighs 0, whatever its output (NaN included); a row that saw nothing in both is 0."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w_a, w_b = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    total = (w_a + w_b).clamp_min(torch.finfo(torch.float32).tiny)
    part_a = torch.where(w_a > 0, out_a.float() * w_a, 0.0)
    part_b = torch.where(w_b > 0, out_b.float() * w_b, 0.0)
    return ((part_a + part_b) / total).to(out_a.dtype)


_compiled_merge_two = torch.compile(_merge_two, dynamic=False, fullgraph=True)


def vote_attention_chunk(
    q: Tensor, keys_new: Tensor, values_new: Tensor, keys_past: Tensor, values_past: Tensor,
    log_votes_past: Tensor, compiled: bool = True,
) -> Tensor:
    """Vote attention of a prefill chunk as two fused attentions merged by their log-sum-exp (the ``"split"``
    prefill kernel): the chunk's own keys under a causal mask, and the slots written before the chunk, all
    visible, with ``+ ln p`` as an additive bias broadcast over the query rows (``[B, H, 1, S]``: no ``T x S``
    tensor is built). Exactly :func:`vote_attention_flex` when its preconditions hold:

    - the chunk's keys are the ``T`` new slots, in position order, every real query's position later than every
      past slot's (true in prefill, and for :meth:`GenerationEngine.extend` after a compression), ``ln p = 0``
      for them, and in each row the padding (if any) comes after the real tokens (a padding query's output is
      not defined here; the engine ignores it);
    - no sliding window.

    Shapes: ``q [B, H, T, D]``, ``keys_new/values_new [B, H_kv, T, D]``, ``keys_past/values_past [B, H_kv, S, D]``
    (``S`` may be 0), ``log_votes_past [B, H_kv, S]`` float32. Work is ``T^2 / 2 + T S`` scores (the flash
    kernel skips the upper triangle), against ``T x capacity`` tiles for flex. The shapes depend on ``S``; the
    two attentions are single ATen kernels (nothing to recompile) and the merge is compiled per chunk shape.
    """
    batch, num_heads, q_len, _ = q.shape
    group_size = num_heads // keys_new.shape[1]
    past = keys_past.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, keys_new, values_new, is_causal=True, enable_gqa=group_size > 1)
    out_new, lse_new = _attention_with_lse(q, keys_new, values_new, True, None)
    bias = log_votes_past[:, :, None, :].to(torch.float32)
    if group_size > 1:
        bias = bias.repeat_interleave(group_size, dim=1)
    out_past, lse_past = _attention_with_lse(q, keys_past, values_past, False,
                                             bias.expand(batch, num_heads, q_len, past))
    # a head whose past slots are all empty saw nothing there: the CPU flash kernel reports such a row as
    # out = 0, lse = 0 (not -inf), so it is marked here
    seen = torch.isfinite(bias[..., 0, :]).any(dim=-1, keepdim=True)  # [B, H, 1]
    lse_past = torch.where(seen, lse_past, -float("inf"))
    merge = _compiled_merge_two if compiled else _merge_two
    return merge(out_new, lse_new, out_past, lse_past)


def vote_attention(
    q: Tensor, keys: Tensor, values: Tensor, log_votes: Tensor, kv_positions: Tensor, q_positions: Tensor,
    sliding_window: int | None = None, kernel: str = "flex", runtime: RuntimeOptions = DEFAULT_RUNTIME,
) -> Tensor:
    """Vote-weighted attention with the chosen kernel (``"flex"`` or ``"reference"``); see the module doc.

    ``"flex"`` runs one-token queries (decode) through :func:`decode_kernel_for` (``runtime.decode_kernel``)."""
    if kernel == "flex":
        decode_kernel = ("flex" if q.shape[2] != 1
                         else decode_kernel_for(q.dtype, keys.shape[2], runtime, device=q.device))
        if decode_kernel == "packed":
            return vote_attention_packed(q, keys, values, log_votes, kv_positions, q_positions, sliding_window,
                                         runtime.decode_pieces)
        if decode_kernel == "sdpa":
            return vote_attention_sdpa(q, keys, values, log_votes, kv_positions, q_positions, sliding_window)
        return vote_attention_flex(q, keys, values, log_votes, kv_positions, q_positions, sliding_window,
                                   runtime.flex_block_size, runtime)
    if kernel == "reference":
        if q.shape[2] <= REFERENCE_QUERY_BLOCK:
            return vote_attention_reference(q, keys, values, log_votes, kv_positions, q_positions, sliding_window)
        # query rows are independent: blocks bound the dense [B, H, T, C] float32 logits of a long eager chunk
        return torch.cat([
            vote_attention_reference(q[:, :, start: start + REFERENCE_QUERY_BLOCK], keys, values, log_votes,
                                     kv_positions, q_positions[:, start: start + REFERENCE_QUERY_BLOCK],
                                     sliding_window)
            for start in range(0, q.shape[2], REFERENCE_QUERY_BLOCK)
        ], dim=2)
    raise ValueError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(ATTENTION_KERNELS)}")
