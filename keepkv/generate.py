"""Prefill (chunked) -> decode loop over fixed-capacity caches, with one compiled decode step.

The :class:`GenerationEngine` owns the per-layer caches of a :class:`~keepkv.models.transformer.Transformer`
and two code paths:

- **prefill**: the prompt runs through the network in chunks of ``prefill_chunk_size`` tokens (the last chunk is
  padded to that size when the compiled FlexAttention kernel is used, so its graph is compiled once per
  (chunk, capacity)); peak activation memory is one chunk's, never a prompt x prompt score matrix. With
  ``prefill_chunk_size=None`` (automatic, the default) the chunk is :data:`DEFAULT_PREFILL_CHUNK`, and the
  prompt goes in *long* chunks of :func:`automatic_long_chunk` tokens first, then the rest in ordinary chunks
  (:func:`chunk_widths`): two compiled chunk shapes at most, so nothing compiles per prompt length. A cache whose
  results do not depend on the chunk (the full cache, ``prefill_compression="once"``) takes long chunks where the
  fused split kernel runs them, of :func:`uncompressed_long_chunk` tokens (one of two widths, so at most one more
  compiled merge shape per process), the remainder first and unpadded (:func:`remainder_first_widths`: that forward
  attends to itself only, so nothing in it is compiled per width); a cache compressed during prefill takes them on
  every kernel (its chunks decide when it compresses, so compiled and eager engines must feed the same widths) and
  its prefill buffer holds ``budget + long chunk`` slots (:meth:`GenerationEngine.prefill_room`);
- **decode**: one token per row per step through ``torch.compile(fullgraph=True, dynamic=False)``. Every shape in
  the step is fixed (capacity-sized buffers, a tensor cursor, tensor positions), so the step compiles once per
  (model, dtype, batch, capacity) and never recompiles as the context grows.

How big the caches are and when they are compressed is the cache manager's business
(:mod:`keepkv.cache.manager`): the engine asks it to make room before every forward and tells it when prefill ends.
Every such call returns the manager's current caches, which the engine hands to the network (:meth:`_use`: only
when they changed). All that bookkeeping uses Python integers mirroring the tensor cursors, so the compiled step
never syncs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from keepkv.cache import LayerKVCache
from keepkv.cache.manager import CacheManager, round_up
from keepkv.compile_limits import allow_graph_per_shape
from keepkv.errors import KeepKVError
from keepkv.logs import PREFILL_PROGRESS_MIN_CHUNKS, progress
from keepkv.models.config import ModelConfig
from keepkv.models.transformer import Transformer
from keepkv.ops.attention import prefill_kernel_for
from keepkv.runtime import RuntimeOptions
from keepkv.sampling import SamplingConfig, sample_next_token

DEFAULT_PREFILL_CHUNK = 512
"""The ordinary prompt tokens per prefill forward of an automatic engine (``prefill_chunk_size=None``, the default):
the pieces after the long chunks, the padding unit of a compiled engine, and the room of a compressed prefill buffer
where no long chunk applies (H2O, a batch too large for the activation bound)."""


def activation_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Estimated bytes one prompt token holds at the peak of a decoder layer's prefill forward: the MLP's gate,
    up, activation and product rows (``4 * intermediate``; an upper bound: an engine's eager prefill computes the
    SwiGLU in place in two reused buffers, ``MLP.forward``), the query / key / value / attention-output rows
    (``(2 * heads + 2 * kv_heads) * head_dim``) and four hidden-state rows (residual, normed, float32 norm
    statistics counted as two), at the activations' ``dtype``. The attention kernels of a compiled prefill are
    fused (no ``T x S`` score matrix), so nothing grows with the cache."""
    rows = (4 * config.intermediate_size + (2 * config.num_heads + 2 * config.num_kv_heads) * config.head_dim
            + 4 * config.hidden_size)
    return rows * torch.empty((), dtype=dtype).element_size()


def _tokens_within_activation_bound(config: ModelConfig, dtype: torch.dtype, batch_size: int,
                                    runtime: RuntimeOptions) -> int:
    return runtime.prefill_activation_bytes // max(1, batch_size * activation_bytes_per_token(config, dtype))


def automatic_long_chunk(config: ModelConfig, dtype: torch.dtype, batch_size: int, chunk: int,
                         runtime: RuntimeOptions) -> int:
    """The long prefill chunk of an automatic engine: the largest multiple of ``chunk`` that is at most
    ``runtime.prefill_long_chunk`` tokens and whose activations (``batch_size`` rows of
    :func:`activation_bytes_per_token`) stay within ``runtime.prefill_activation_bytes``; at least ``chunk``."""
    fits = _tokens_within_activation_bound(config, dtype, batch_size, runtime)
    return max(chunk, min(runtime.prefill_long_chunk, fits) // chunk * chunk)


def uncompressed_long_chunk(config: ModelConfig, dtype: torch.dtype, batch_size: int, chunk: int,
                            runtime: RuntimeOptions, tokens: int) -> int:
    """The long chunk of an automatic prefill that compresses nothing before its end (the full cache,
    ``prefill_compression="once"``) for a ``tokens``-token prompt: ``runtime.prefill_uncompressed_long_chunk``
    (or ``runtime.prefill_long_chunk`` if that is larger; rounded down to a multiple of ``chunk``) when the prompt
    holds one whole and its activations stay within ``runtime.prefill_activation_bytes``; otherwise
    :func:`automatic_long_chunk`. Only these two widths, never one in between, so a process compiles at most one
    merge graph per width."""
    wide = max(runtime.prefill_uncompressed_long_chunk, runtime.prefill_long_chunk) // chunk * chunk
    if wide > chunk and tokens >= wide and wide <= _tokens_within_activation_bound(config, dtype, batch_size, runtime):
        return wide
    return automatic_long_chunk(config, dtype, batch_size, chunk, runtime)


def chunk_widths(tokens: int, chunk: int, long_chunk: int) -> list[int]:
    """Forward widths covering ``tokens`` prompt tokens: as many ``long_chunk`` pieces as fit whole, then pieces
    of ``chunk`` (the last one may hold fewer real tokens; a compiled engine pads it to ``chunk``). With
    ``long_chunk == chunk`` these are the plain chunks."""
    longs = tokens // long_chunk if long_chunk > chunk else 0
    rest = tokens - longs * long_chunk
    return [long_chunk] * longs + [chunk] * -(-rest // chunk)


def remainder_first_widths(tokens: int, long_chunk: int) -> list[int]:
    """Forward widths of a prompt whose results do not depend on its chunks: the remainder ``tokens mod
    long_chunk`` first, unpadded, then whole long chunks; ``[long_chunk] * n`` when it divides ``tokens``.

    The split kernel attends the first forward to itself only (one causal call, no merge, nothing compiled), so
    its width may be anything, and every later forward has the long width (one merge graph). Against the
    remainder in ordinary chunks at the end (:func:`chunk_widths`), which attend to the whole prompt before them
    in narrow, slower calls and re-read every weight per chunk, this feeds the same tokens in fewer, wider
    forwards. A one-token remainder is refused (a one-token forward would leave the split kernel for the decode
    kernel, compiled per cache capacity): :meth:`GenerationEngine.prefill_widths` takes :func:`chunk_widths` then."""
    longs, rest = divmod(tokens, long_chunk)
    if longs == 0 or rest == 1:
        raise ValueError(f"remainder_first_widths needs at least one long chunk and a remainder other than 1 "
                         f"({tokens} tokens, long chunk {long_chunk})")
    return ([rest] if rest else []) + [long_chunk] * longs


def positions_from_valid(valid: Tensor) -> Tensor:
    """Token positions ``[batch, T]``: each row counts only its real tokens (padding gets position 0)."""
    return (valid.long().cumsum(dim=1) - 1).clamp_min(0)


@dataclass
class GenerationStats:
    """What one generation did and how long it took (wall-clock seconds)."""

    batch_size: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    first_step_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    cache_capacity: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        """Steady-state decode steps per second (per sequence): the first decode step, which includes any
        compilation, is timed apart in ``first_step_seconds``."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class GenerationEngine:
    """Runs a :class:`Transformer` over its caches. ``compile=True`` compiles the decode step and uses the
    FlexAttention kernel; ``compile=False`` runs everything eagerly with the dense reference attention.
    ``runtime`` (:class:`~keepkv.runtime.RuntimeOptions`, set once: kernel choices, capacity rounding, compile
    limits) is given to the network's attention layers and to the default cache manager; ``None`` keeps the
    options the network already runs with (``network.runtime``). A ``cache_manager`` given here should be built
    with the same options.

    ``prefill_chunk_size``: prompt tokens per prefill forward, used as given for every prompt; ``None``
    (automatic, the default: measured faster in float32 and bfloat16, ``docs/profile.md`` "Automatic prefill
    chunks") means :data:`DEFAULT_PREFILL_CHUNK`, plus long chunks (:func:`automatic_long_chunk`) in
    :meth:`prefill` and :meth:`teacher_forced_logits` (:meth:`long_chunk`; a cache compressed during prefill
    also gets a prefill buffer of ``budget + long chunk`` slots, :meth:`prefill_room`). :attr:`prefill_chunk_size`
    is always the integer chunk (the padding unit); :attr:`prefill_chunk_setting` is what was asked for (``None``
    or the integer), for building another engine on the same network with the same choice."""

    def __init__(
        self, network: Transformer, *, compile: bool = True, prefill_chunk_size: int | None = None,
        cache_manager: CacheManager | None = None, runtime: RuntimeOptions | None = None,
    ) -> None:
        if prefill_chunk_size is not None and (isinstance(prefill_chunk_size, bool)
                                               or not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1):
            raise KeepKVError(f"prefill_chunk_size must be a positive integer or None (automatic), "
                              f"got {prefill_chunk_size!r}")
        self.network = network
        self.config = network.config
        self.compile = compile
        self.automatic_chunks = prefill_chunk_size is None
        self.prefill_chunk_size = DEFAULT_PREFILL_CHUNK if prefill_chunk_size is None else prefill_chunk_size
        runtime = network.runtime if runtime is None else runtime
        self.runtime = runtime
        self.kernel = "flex" if compile else "reference"
        network.set_attention_kernel(self.kernel)
        network.set_runtime_options(runtime)
        self.cache_manager = cache_manager or CacheManager(self.config, self.dtype, self.device, runtime=runtime)
        self.cache_manager.bind_network(network)  # methods that read weights (CriticalKV's W_O) get the model
        self._attached: list[LayerKVCache] | None = None  # the caches this engine last attached (_use)
        self._first_attention = network.attention_layers[0]
        if compile:
            allow_graph_per_shape(runtime.graphs_per_function)  # once per engine, before anything is traced
        self._decode_compiled = torch.compile(self._decode, fullgraph=True, dynamic=False) if compile else None

    @property
    def prefill_chunk_setting(self) -> int | None:
        """The ``prefill_chunk_size`` this engine was built with: ``None`` (automatic) or the explicit integer."""
        return None if self.automatic_chunks else self.prefill_chunk_size

    @property
    def device(self) -> torch.device:
        return self.network.inv_freq.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.model.embed_tokens.weight.dtype

    @property
    def caches(self) -> list[LayerKVCache]:
        return self.cache_manager.caches

    # ---- caches -------------------------------------------------------------------------------------------
    def prepare_caches(self, batch_size: int, prompt_tokens: int, max_new_tokens: int,
                       row_prompt_tokens: list[int] | None = None) -> None:
        """Allocate (or reuse and clear) the caches for a batch and attach them to the network.

        ``prompt_tokens``: the longest row (the padded width); ``row_prompt_tokens``: each row's real length
        (optional; a compressed cache reports the budget each row would have alone)."""
        padded = round_up(prompt_tokens, self.prefill_chunk_size) if self.compile else prompt_tokens
        self._use(self.cache_manager.allocate(batch_size, padded, max_new_tokens, self.prefill_room(batch_size),
                                              prompt_tokens, row_prompt_tokens=row_prompt_tokens))

    def prefill_room(self, batch_size: int) -> int:
        """The slots a cache compressed during prefill keeps free for the next forward (its prefill buffer holds
        ``budget + room``; it compresses when the next forward would not fit), and the long chunk its prompt is fed
        in (:meth:`long_chunk`): :func:`automatic_long_chunk` for an automatic engine, else
        :attr:`prefill_chunk_size`.

        The same on every kernel and whatever the padding of the rows, so a compiled and an eager engine compress
        at the same points and keep the same entries. It depends on the batch only through the activation budget
        (:func:`automatic_long_chunk`: a large batch keeps ordinary chunks); pass an integer ``prefill_chunk_size``
        to fix it. Methods that accumulate attention over every query (H2O: a ``[B, H, chunk, slots]`` float32
        product per layer, not in the activation estimate) keep ordinary chunks. A prompt of at most ``budget +
        room`` tokens is then compressed once, at its end, with the question it ends with in view (the official
        KeepKV / SnapKV protocol); a longer one every time ``budget + room`` slots fill, as before but less often
        (``docs/profile.md``, section 14)."""
        chunk = self.prefill_chunk_size
        manager = self.cache_manager
        if (not self.automatic_chunks or not manager.compresses_during_prefill
                or manager.method.needs_accumulated_attention):
            return chunk
        return automatic_long_chunk(self.config, self.dtype, batch_size, chunk, self.runtime)

    def _use(self, caches: list[LayerKVCache]) -> None:
        """Attach ``caches`` (what a cache-manager call returned) to the network unless it already holds them: the
        list this engine attached last (a manager returns a new list when it replaces caches) and still in the first
        layer (several engines may share one network). Two identity checks: this runs before every decode step."""
        if caches is not self._attached or self._first_attention.kv_cache is not caches[0]:
            self.network.attach_caches(caches)
            self._attached = caches

    def cache_bytes(self) -> int:
        return self.cache_manager.resident_bytes()

    # ---- forward passes -----------------------------------------------------------------------------------
    def _split_prefill_past(self, valid: Tensor) -> list[int] | None:
        """Per layer, the slots written before this chunk when the chunk may take the split prefill kernel
        (:func:`keepkv.ops.attention.vote_attention_chunk`), else None. Conditions: compiled engine, the kernel
        chosen for the device is ``"split"``, more than one token, no sliding window, no compression inside the
        forward (oracle mode), and in every row no padding before a real token (one host read of the chunk's
        ``valid``: prefill runs outside the compiled decode step)."""
        if not self.compile or valid.shape[1] < 2 or self.config.sliding_window is not None:
            return None
        if prefill_kernel_for(self.device, self.runtime) != "split":
            return None
        if any(getattr(cache, "inline_compression", None) is not None for cache in self.caches):
            return None
        if not bool((valid[:, 1:] <= valid[:, :-1]).all()):
            return None
        return list(self.cache_manager.cursors)

    def long_chunk(self, valid: Tensor) -> int:
        """The widest prefill forward for the prompt whose validity mask is ``valid [B, T]``.

        A cache compressed during prefill: :meth:`prefill_room` (kernel-independent, so compiled and eager engines
        keep the same entries). Otherwise the long chunk of an automatic engine (:func:`uncompressed_long_chunk`) when
        the long chunk runs the fused split kernel, else :attr:`prefill_chunk_size`. Conditions:
        ``prefill_chunk_size=None``, the prompt at least one long chunk long, and the split kernel for every chunk
        of it (:meth:`_split_prefill_past`'s conditions over the whole prompt: FlexAttention and the eager
        reference keep ordinary chunks, so their compiled graphs and memory stay as they were)."""
        chunk = self.prefill_chunk_size
        if self.cache_manager.compresses_during_prefill:
            return self.prefill_room(valid.shape[0])
        if not self.automatic_chunks:
            return chunk
        long_chunk = uncompressed_long_chunk(self.config, self.dtype, valid.shape[0], chunk, self.runtime,
                                             valid.shape[1])
        if long_chunk <= chunk or valid.shape[1] < long_chunk or self._split_prefill_past(valid) is None:
            return chunk
        return long_chunk

    def prefill_widths(self, valid: Tensor) -> list[int]:
        """The forward widths of a prompt with validity mask ``valid [B, T]``: :func:`remainder_first_widths` of
        :meth:`long_chunk` when the prompt takes long chunks and its results do not depend on them (the full cache,
        ``prefill_compression="once"``), else :func:`chunk_widths` (a cache compressed during prefill keeps its
        compression points: long chunks first, the rest in ordinary chunks; so does a one-token remainder, see
        :func:`remainder_first_widths`)."""
        tokens, chunk, long_chunk = valid.shape[1], self.prefill_chunk_size, self.long_chunk(valid)
        if long_chunk <= chunk or tokens % long_chunk == 1 or self.cache_manager.compresses_during_prefill:
            return chunk_widths(tokens, chunk, long_chunk)
        return remainder_first_widths(tokens, long_chunk)

    def _forward_chunk(self, input_ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        self._use(self.cache_manager.make_room(input_ids.shape[1]))
        self.network.set_prefill_past_slots(self._split_prefill_past(valid) if input_ids.shape[1] > 1 else None)
        try:
            hidden = self.network(input_ids, positions, valid)
        finally:
            self.network.set_prefill_past_slots(None)
        self.cache_manager.wrote(input_ids.shape[1])
        return hidden

    def _run_chunks(self, input_ids: Tensor, positions: Tensor, valid: Tensor,
                    widths: list[int] | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """Feed the sequence chunk by chunk (``widths``, default: chunks of :attr:`prefill_chunk_size`); yield
        ``(start, real width, hidden [B, chunk, hidden])``.

        With the compiled kernel a chunk shorter than its width (the last one of :func:`chunk_widths`) is padded
        (``valid = False``) to that width, so compiled code sees at most two chunk shapes and compiles once per
        shape; the unpadded first forward of :func:`remainder_first_widths` runs no compiled code.
        """
        if widths is None:
            widths = chunk_widths(input_ids.shape[1], self.prefill_chunk_size, self.prefill_chunk_size)
        start = 0
        for chunk in widths:
            # fresh standard strides: a view of the prompt would trip the compiled kernel's stride guards
            ids, pos, ok = (
                t[:, start : start + chunk].clone(memory_format=torch.contiguous_format)
                for t in (input_ids, positions, valid)
            )
            width = ids.shape[1]
            if self.compile and width < chunk:
                pad = (0, chunk - width)
                ids, pos = F.pad(ids, pad), F.pad(pos, pad)
                ok = F.pad(ok, pad, value=False)
            yield start, width, self._forward_chunk(ids, pos, ok)
            start += chunk

    def prefill(self, input_ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Run the prompt; return ``(logits of each row's last real token [B, vocab], next positions [B])``. Call it
        under ``torch.inference_mode`` (as :meth:`generate_tokens` does): only there do the MLPs reuse the
        prefill's scratch buffers (``Transformer.scratch_buffers``)."""
        batch = input_ids.shape[0]
        positions = positions_from_valid(valid)
        lengths = valid.sum(dim=1)
        last_index = torch.where(lengths > 0, valid.long().cumsum(1).argmax(1), 0)
        last_hidden = torch.zeros(batch, self.config.hidden_size, dtype=self.dtype, device=self.device)
        widths = self.prefill_widths(valid)
        chunks = progress(self._run_chunks(input_ids, positions, valid, widths), desc="prefill", unit="chunk",
                          total=len(widths), min_total=PREFILL_PROGRESS_MIN_CHUNKS)
        with self.network.scratch_buffers():  # the MLP activations of every chunk in one reused pair of buffers
            for start, width, hidden in chunks:  # a tqdm bar for long prompts on a terminal (keepkv.logs; host side)
                in_chunk = (last_index >= start) & (last_index < start + width)
                picked = hidden[torch.arange(batch, device=self.device), (last_index - start).clamp(0, width - 1)]
                last_hidden = torch.where(in_chunk[:, None], picked, last_hidden)
        return self.network.project(last_hidden), lengths

    def _decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        valid = torch.ones_like(tokens, dtype=torch.bool)
        hidden = self.network(tokens, positions, valid)
        return self.network.project(hidden[:, -1])

    def decode_step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits ``[B, vocab]`` for one new token per row (``tokens``, ``positions``: ``[B]``)."""
        self._use(self.cache_manager.make_room(1))
        step = self._decode_compiled if self._decode_compiled is not None else self._decode
        with torch.inference_mode():  # inputs as inference tensors whatever the caller's mode: dynamo guards on
            # that (dispatch keys), so a caller mixing modes would otherwise get a second decode graph; the
            # engine's own loop already passes inference tensors (no copy per step then)
            logits = step(*(t[:, None] if t.is_inference() and t.is_contiguous() else t[:, None].clone()
                            for t in (tokens, positions)))
        self.cache_manager.wrote(1)
        return logits

    def end_prefill(self) -> None:
        """Tell the cache manager the prompt is in (it compresses to the budget and moves to the decode buffers)."""
        self._use(self.cache_manager.end_prefill())

    def start_from_prefill(self, source: list[LayerKVCache], prompt_tokens: int, max_new_tokens: int,
                           compress: bool = True) -> None:
        """Continue from a prefill made elsewhere (evaluation: one full prefill shared by several methods): the
        cache manager copies ``source`` (not modified), compresses it to the budget unless ``compress=False`` and
        makes room for ``max_new_tokens`` more tokens; the copies are attached. Follow with :meth:`extend` (a
        suffix such as a question) and :meth:`decode_step`. See ``CacheManager.start_from_prefill``."""
        self._use(self.cache_manager.start_from_prefill(source, prompt_tokens, max_new_tokens, compress=compress))

    def extend(self, input_ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, T, vocab]`` (float32) of ``input_ids [B, T]`` at ``positions [B, T]``
        appended to the current caches (no reset), in chunks of ``prefill_chunk_size``; the cache manager
        compresses whenever a chunk would not fit, as in prefill. Used to feed a question after a compression."""
        with torch.inference_mode(), self.network.scratch_buffers():
            pieces = [
                self.network.project(hidden[:, :width])
                for _, width, hidden in self._run_chunks(input_ids, positions, valid)
            ]
        return torch.cat(pieces, dim=1)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate_tokens(
        self, input_ids: Tensor, valid: Tensor, max_new_tokens: int, sampling: SamplingConfig,
        stop_token_ids: tuple[int, ...] = (), stats: GenerationStats | None = None,
    ) -> Iterator[Tensor]:
        """Yield ``[B]`` token tensors, one per step, until ``max_new_tokens`` or every row hit a stop token.

        Rows that already stopped keep receiving their stop token (ignored by the caller).
        """
        stats = stats if stats is not None else GenerationStats()
        batch, prompt_len = input_ids.shape
        rows = valid.sum(dim=1).tolist() if batch > 1 else None  # one host read, before prefill
        self.prepare_caches(batch, prompt_len, max_new_tokens, rows)
        stats.batch_size, stats.prompt_tokens = batch, prompt_len
        generator = sampling.make_generator(self.device)
        stop = torch.tensor(stop_token_ids or (-1,), device=self.device)
        started = time.perf_counter()
        with torch.inference_mode():
            logits, positions = self.prefill(input_ids, valid)
            self.end_prefill()
            stats.cache_capacity = self.caches[0].capacity
            token = sample_next_token(logits, sampling, generator)
            stats.prefill_seconds = time.perf_counter() - started
            finished = torch.isin(token, stop)
            stats.new_tokens = 1
            yield token
            all_finished = bool(finished.all())
            for step in range(max_new_tokens - 1):
                if all_finished:
                    break
                step_started = time.perf_counter()
                logits = self.decode_step(token, positions)
                positions = positions + 1
                next_token = sample_next_token(logits, sampling, generator)
                token = torch.where(finished, token, next_token)
                finished = finished | torch.isin(token, stop)
                all_finished = bool(finished.all())  # host read: the step has really finished when it returns
                step_seconds = time.perf_counter() - step_started
                if step == 0:
                    stats.first_step_seconds = step_seconds
                else:
                    stats.decode_seconds += step_seconds
                    stats.decode_steps += 1
                stats.new_tokens += 1
                yield token

    def teacher_forced_logits(self, input_ids: Tensor, valid: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` (float32) at every position of ``input_ids``, computed chunk by chunk."""
        batch, length = input_ids.shape
        self.prepare_caches(batch, length, 0)
        positions = positions_from_valid(valid)
        widths = self.prefill_widths(valid)
        with torch.inference_mode(), self.network.scratch_buffers():
            pieces = [
                self.network.project(hidden[:, :width])
                for _, width, hidden in self._run_chunks(input_ids, positions, valid, widths)
            ]
        return torch.cat(pieces, dim=1)
