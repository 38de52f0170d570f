"""Runtime options: how a loaded model runs (kernel choice, cache sizing, compile limits), never what it computes.

One frozen :class:`RuntimeOptions` is given to :func:`keepkv.load` (``runtime=``), or to a
:class:`~keepkv.generate.GenerationEngine` / cache manager built by hand, and handed down to the code that reads
it: the attention layers (kernel choice, read when a graph is traced), the cache manager (capacity rounding) and
the engine (dynamo's recompile limits, raised once when it compiles). It is set once per model; every kernel
computes the same attention, so the options change speed and memory, not results (up to float rounding).

The defaults are the measured best on CPU (``docs/profile.md``, "Measurements behind the code's choices").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keepkv.compile_limits import GRAPHS_PER_FUNCTION
from keepkv.errors import KeepKVError
from keepkv.ops.flex_mods import FLEX_BLOCK_SIZE

DECODE_KERNELS = ("auto", "packed", "sdpa", "flex")
PREFILL_KERNELS = ("auto", "split", "flex")
SIXTEEN_BIT_DTYPES = (torch.bfloat16, torch.float16)
REDUCTION_GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Weight dtypes whose one-row products take the compiled reduction form by default (:mod:`keepkv.ops.linear`)."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Options of a model's kernels and caches (frozen: one value per model, safe to read while tracing).

    - ``decode_kernel``: the attention kernel of one-token queries in a compiled model, one of
      :data:`DECODE_KERNELS`; ``"auto"`` picks ``"sdpa"`` for 16-bit caches of at most ``sdpa_decode_max_slots``
      slots per KV head (on a CPU only with AMX tiles, where it was measured faster) and ``"packed"`` otherwise
      (:func:`keepkv.ops.attention.decode_kernel_for`);
    - ``sdpa_decode_max_slots`` (>= 0): that threshold;
    - ``decode_pieces`` (>= 1): the most pieces the packed decode kernel splits the cache into
      (:func:`keepkv.ops.attention.decode_pieces`);
    - ``vote_column_dtypes``: dtypes whose prefill chunks carry ``ln p`` as two extra key columns instead of
      FlexAttention's ``score_mod`` (:func:`keepkv.ops.attention.votes_as_key_columns`);
    - ``flex_block_size``: ``(query rows, cache slots)`` of one FlexAttention tile, the unit the vote block mask
      classifies (:func:`keepkv.ops.flex_mods.vote_block_mask`);
    - ``reduction_dtypes``: weight dtypes whose single-row products (batch-1 decode) run as a float32-accumulated
      reduction inside a compiled graph instead of ``F.linear`` (:func:`keepkv.ops.linear.linear`);
    - ``prefill_kernel``: the kernel of a compiled model's prefill chunks, one of :data:`PREFILL_KERNELS`;
      ``"auto"`` picks ``"split"`` on the CPU and ``"flex"`` elsewhere
      (:func:`keepkv.ops.attention.prefill_kernel_for`);
    - ``capacity_quantum`` (>= 1): full caches are allocated in multiples of this many slots, so prompts of
      similar lengths share one compiled decode graph;
    - ``graphs_per_function`` (>= 8): how many shape-specialised graphs one compiled function may have in a
      process (:func:`keepkv.compile_limits.allow_graph_per_shape`);
    - ``prefill_long_chunk`` (>= 1) and ``prefill_activation_bytes`` (>= 1): the automatic prefill chunks
      (``load(prefill_chunk_size=None)``): prompt pieces of up to ``prefill_long_chunk`` tokens, fewer when one
      chunk's activations would pass ``prefill_activation_bytes`` (:func:`keepkv.generate.automatic_long_chunk`);
      a cache compressed during prefill also gets that many slots of room (its prefill buffer);
    - ``prefill_uncompressed_long_chunk`` (>= 1): a wider long chunk for a prefill that compresses nothing before
      its end (the full cache, ``prefill_compression="once"``), whose results do not depend on its chunks: used
      where the prompt holds one whole and its activations fit ``prefill_activation_bytes``, else the chunk of
      ``prefill_long_chunk`` (:func:`keepkv.generate.uncompressed_long_chunk`; ``docs/profile.md``, section 22);
      below ``prefill_long_chunk``, that one applies (a full cache is never fed narrower chunks than a compressed one);
    """

    decode_kernel: str = "auto"
    sdpa_decode_max_slots: int = 4096
    decode_pieces: int = 8
    vote_column_dtypes: tuple[torch.dtype, ...] = SIXTEEN_BIT_DTYPES
    flex_block_size: tuple[int, int] = FLEX_BLOCK_SIZE
    reduction_dtypes: tuple[torch.dtype, ...] = REDUCTION_GEMV_DTYPES
    prefill_kernel: str = "auto"
    capacity_quantum: int = 256
    graphs_per_function: int = GRAPHS_PER_FUNCTION
    prefill_long_chunk: int = 2048
    prefill_uncompressed_long_chunk: int = 4096
    prefill_activation_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        if self.decode_kernel not in DECODE_KERNELS:
            raise KeepKVError(f"unknown decode_kernel {self.decode_kernel!r}; allowed: {', '.join(DECODE_KERNELS)}")
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise KeepKVError(f"unknown prefill_kernel {self.prefill_kernel!r}; allowed: "
                              f"{', '.join(PREFILL_KERNELS)}")
        for name, least in (("sdpa_decode_max_slots", 0), ("decode_pieces", 1), ("capacity_quantum", 1),
                            ("graphs_per_function", 8),
                            ("prefill_long_chunk", 1), ("prefill_uncompressed_long_chunk", 1),
                            ("prefill_activation_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise KeepKVError(f"{name} must be an integer >= {least}, got {value!r}")
        block = self.flex_block_size
        if (not isinstance(block, tuple) or len(block) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in block)):
            raise KeepKVError(f"flex_block_size must be a pair of integers >= 1 (query rows, slots), got {block!r}")
        for name in ("vote_column_dtypes", "reduction_dtypes"):
            dtypes = getattr(self, name)
            if not isinstance(dtypes, tuple) or not all(isinstance(d, torch.dtype) for d in dtypes):
                raise KeepKVError(f"{name} must be a tuple of torch dtypes, got {dtypes!r}")


DEFAULT_RUNTIME = RuntimeOptions()
"""The defaults, used wherever no options are given."""
