"""Fixed-capacity per-layer KV buffers.

One :class:`LayerKVCache` per decoder layer holds, for ``capacity`` slots:

- ``keys``, ``values``: ``[batch, kv_heads, capacity, head_dim]`` in the model dtype (keys already RoPE-rotated);
- ``log_votes``: ``[batch, kv_heads, capacity]`` float32, ``ln p_i`` (0 = an ordinary entry, ``-inf`` = empty);
- ``positions``: ``[batch, kv_heads, capacity]`` int32 token position of each slot (-1 when empty);
- ``cursor``: a 1-element int64 tensor, the next slot to write.

The shapes never change during a generation, so a compiled decode step sees the same graph at every step; the
cursor is a tensor (not a Python int) for the same reason. New tokens are written at ``cursor .. cursor+T-1`` for
every batch row and head; padding tokens are written with ``log_votes = -inf`` and are never attended to.
Compression methods compact the buffers in place and move the cursor back (see ``keepkv.cache.policy``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POSITION_DTYPE = torch.int32


class LayerKVCache(nn.Module):
    """The KV buffers of one layer (see the module docstring for the fields).

    Buffers are always normal tensors, even when a cache is built inside ``torch.inference_mode`` (the engine
    builds prefill caches outside it and decode caches inside ``end_prefill``): dynamo guards on the tensor kind,
    so one kind keeps one compiled graph for prefill- and decode-time compressions. In-place writes to normal
    tensors are allowed in inference mode."""

    @torch.inference_mode(False)
    def __init__(
        self, batch_size: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "log_votes", torch.full(shape[:3], -float("inf"), dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer(
            "positions", torch.full(shape[:3], -1, dtype=POSITION_DTYPE, device=device), persistent=False
        )
        self.register_buffer("cursor", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        """Empty every slot (buffers keep their storage, so compiled graphs stay valid)."""
        self.keys.zero_()
        self.values.zero_()
        self.log_votes.fill_(-float("inf"))
        self.positions.fill_(-1)
        self.cursor.zero_()

    def write(self, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor) -> None:
        """Append ``T`` tokens at the cursor.

        Args:
            keys, values: ``[batch, kv_heads, T, head_dim]``.
            positions: ``[batch, T]`` token positions.
            valid: ``[batch, T]`` bool, False for padding (written with ``log_votes = -inf``).
        The caller guarantees ``cursor + T <= capacity`` (checked on the host by the generator, never here:
        a check here would be a host sync inside the compiled step).
        """
        num_new = keys.shape[2]
        slots = self.cursor + torch.arange(num_new, device=self.cursor.device)
        self.keys.index_copy_(2, slots, keys.to(self.keys.dtype))
        self.values.index_copy_(2, slots, values.to(self.values.dtype))
        new_log_votes = torch.where(valid, 0.0, -float("inf")).to(torch.float32)
        kv_heads = self.keys.shape[1]
        self.log_votes.index_copy_(2, slots, new_log_votes[:, None, :].expand(-1, kv_heads, -1))
        self.positions.index_copy_(2, slots, positions.to(POSITION_DTYPE)[:, None, :].expand(-1, kv_heads, -1))
        self.cursor.add_(num_new)

    def observe_queries(self, queries: Tensor, positions: Tensor, valid: Tensor) -> None:
        """Called by attention with the layer's rotated queries ``[batch, heads, T, dim]`` after the new keys are
        written and before attending.

        The plain cache keeps no score state; caches of compression methods override this to record what their
        scorer needs (observation-window queries, accumulated attention) and, in oracle mode, to compress with
        the current query as the reference.
        """

    def live_entries(self) -> Tensor:
        """``[batch, kv_heads]`` number of non-empty slots (a host sync if read: not for the hot path)."""
        return torch.isfinite(self.log_votes).sum(dim=-1)

    def resident_bytes(self) -> int:
        """Bytes held by all buffers of this layer."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
