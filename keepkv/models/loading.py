"""``load()``: a model name, a Hugging Face folder or a GGUF file -> a ready :class:`LanguageModel`."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from keepkv.cache.budgets import is_full_budget, validate_budget
from keepkv.cache.manager import DEFAULT_DECODE_SLACK, PREFILL_COMPRESSION
from keepkv.cache.methods import FULL, FullCache, make_method
from keepkv.cache.policy import CompressionMethod
from keepkv.checks import (
    require_bool, require_choice, require_int, require_str, require_text, shown,
)
from keepkv.distributed.group import init_tensor_parallel
from keepkv.distributed.tp import shard_network
from keepkv.errors import KeepKVError
from keepkv.logs import get_logger
from keepkv.models.checkpoint import load_gguf, load_hf_folder
from keepkv.models.language_model import LanguageModel
from keepkv.models.registry import resolve
from keepkv.models.tokenizer import Tokenizer
from keepkv.models.transformer import build_transformer
from keepkv.runtime import DEFAULT_RUNTIME, RuntimeOptions

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")  # platform.machine() of the CPUs slow_cpu_dtype_reason knows
log = get_logger(__name__)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32 | bfloat16 | float16`` or one of their names (``"bf16"`` ...)."""
    if isinstance(dtype, torch.dtype) and dtype in SUPPORTED_DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise KeepKVError(f"unsupported dtype {dtype!r}; allowed: float32, bfloat16, float16")


def slow_cpu_dtype_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why bfloat16 will run slower than float32 on ``device``, or ``None`` (another dtype, not a CPU, not an
    x86 CPU, an x86 CPU with the instructions, or a torch that cannot tell).

    An x86 CPU computes bfloat16 matrix products natively only with AVX-512 BF16 or AMX (probed through
    ``torch.cpu``); without them the products take a slow path, several times slower than float32 (measured on an
    AVX2-only AMD EPYC: docs/profile.md section 25). Other architectures and float16 were not measured, so they get
    no reason. The cast still halves the weights' memory, so a user may want it anyway: ``load()`` logs this on the
    ``"keepkv"`` logger (the command line shows it), it does not refuse.
    """
    if device.type != "cpu" or dtype != torch.bfloat16 or platform.machine().lower() not in X86_MACHINES:
        return None
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes) or any(probe() for probe in probes):
        return None
    return (f"bfloat16 on this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}, no AVX-512 BF16, "
            f"no AMX) runs its matrix products on a slow path, several times slower than float32; pass "
            f"dtype='float32' unless the halved weight memory matters more")


def parse_device(device: torch.device | str | None) -> torch.device:
    """A usable ``torch.device``; ``None`` picks ``cuda`` when available, else ``cpu``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise KeepKVError(
            f"device must be None, a str such as 'cpu' or 'cuda:0', or a torch.device, got {shown(device)}"
        )
    try:
        parsed = torch.device(device)
        torch.empty(1, device=parsed)
    except (RuntimeError, AssertionError, ValueError, TypeError) as err:
        raise KeepKVError(f"device {str(device)!r} is not available here ({err}); try 'cpu'") from None
    if parsed.type == "meta":
        raise KeepKVError("device 'meta' holds no data, so no model can run on it; use 'cpu' or 'cuda'")
    return parsed


def resolve_method(method: str | None, kv_budget: float | int | None, options: dict) -> tuple[str, CompressionMethod]:
    """``(method name, method object)`` (a :class:`~keepkv.cache.methods.full.FullCache` for the full cache).

    ``kv_budget`` with no method means KeepKV; no budget (or ``1.0``) means the full cache. ``method="full"`` with a
    budget below the whole prompt is refused: the full cache would ignore the budget.
    """
    kv_budget = validate_budget(kv_budget)
    require_str(method, "method", allow_none=True)
    if method is None:
        method = FULL if is_full_budget(kv_budget) else "keepkv"
    if method.lower() == FULL and not is_full_budget(kv_budget):
        raise KeepKVError(
            f"method 'full' keeps every entry, but kv_budget={kv_budget!r} asks for compression: drop kv_budget for "
            "the full cache, or name a compressing method (e.g. method='keepkv')"
        )
    method_object = make_method(method, **options)
    if not method_object.keeps_everything and kv_budget is None:
        raise KeepKVError(f"method {method!r} needs a kv_budget: a fraction in (0, 1] or an integer >= 1")
    if is_full_budget(kv_budget):
        method_object = FullCache()  # keeping the whole prompt is the full cache, whatever the method
    return method.lower(), method_object


def check_load_arguments(
    name_or_path: Any, kv_budget: float | int | None, *, compile: Any, prefill_chunk_size: Any, decode_slack: Any,
    revision: Any, local_files_only: Any, prefill_compression: Any = None,
) -> int:
    """Type- and range-check :func:`load`'s plain arguments (see its docstring); returns the decode slack to use."""
    if prefill_compression is not None:
        require_choice(prefill_compression, "prefill_compression", PREFILL_COMPRESSION)
        if kv_budget is None:
            raise KeepKVError(
                f"prefill_compression={prefill_compression!r} only applies to a compressed cache, and no kv_budget "
                "was given: add a kv_budget (e.g. kv_budget=0.1), or leave prefill_compression out"
            )
    if not isinstance(name_or_path, Path):
        require_text(name_or_path, "name_or_path")
        if not name_or_path.strip():
            raise KeepKVError("name_or_path is empty: give a model name, a folder or a .gguf file")
    require_bool(compile, "compile")
    require_int(prefill_chunk_size, "prefill_chunk_size", 1, allow_none=True)
    require_int(decode_slack, "decode_slack", 1, allow_none=True)
    if decode_slack is not None and kv_budget is None:
        raise KeepKVError(
            f"decode_slack={decode_slack} only applies to a compressed cache, and no kv_budget was given: add a "
            "kv_budget (e.g. kv_budget=0.1), or leave decode_slack out for the full cache"
        )
    require_str(revision, "revision", allow_none=True)
    require_bool(local_files_only, "local_files_only", allow_none=True)
    return DEFAULT_DECODE_SLACK if decode_slack is None else decode_slack


def load(
    name_or_path: str | Path, kv_budget: float | int | None = None, method: str | None = None, *,
    dtype: torch.dtype | str = torch.float32, device: torch.device | str | None = None, compile: bool = True,
    prefill_chunk_size: int | None = None, decode_slack: int | None = None, prefill_compression: str | None = None,
    revision: str | None = None, local_files_only: bool | None = None, tp: int = 1,
    runtime: RuntimeOptions | None = None, **method_options: Any,
) -> LanguageModel:
    """Load a model for generation and scoring.

    Args:
        name_or_path: a known model name (``keepkv info --list``; e.g. ``"SmolLM2-135M-Instruct"``,
            ``"Qwen2-7B"``), a hub repo id, a local Hugging Face folder (``config.json`` + ``*.safetensors`` +
            ``tokenizer.json``) or a ``.gguf`` file (llama / qwen2 architectures).
        kv_budget: fraction of the prompt kept in the KV cache, in (0, 1], or an absolute number of entries per
            KV head (int >= 1); ``None`` keeps everything.
        method: KV compression method; ``None`` means ``"keepkv"`` when a budget is given, else ``"full"``.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``; weights are cast straight into it. bfloat16 on
            an x86 CPU without AVX-512 BF16 or AMX logs a warning on the ``"keepkv"`` logger
            (:func:`slow_cpu_dtype_reason`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (default: cuda if available).
        compile: compile the decode step (FlexAttention kernel); ``False`` runs eagerly (dense attention).
        prefill_chunk_size: prompt tokens per prefill forward (bounds activation memory). ``None`` (default):
            automatic, long chunks of up to ``runtime.prefill_long_chunk`` (2048) tokens within
            ``runtime.prefill_activation_bytes`` of activations (the full cache and ``prefill_compression="once"``:
            ``runtime.prefill_uncompressed_long_chunk``, 4096, where the prompt and that bound allow), the rest in
            512-token chunks
            (:data:`keepkv.generate.DEFAULT_PREFILL_CHUNK`). The full cache and ``prefill_compression="once"`` get
            the same results as with any chunk (up to float rounding; long chunks only where the fused kernel runs
            them, the remainder of the prompt first in one forward); a cache compressed during prefill gets a
            ``budget + long chunk`` prefill buffer, so a prompt of up to that many tokens is compressed once, at its
            end (H2O and large batches keep 512). An integer is used as given for every prompt (the compressed buffer
            is then ``budget + chunk``).
        decode_slack: ``W``, new tokens a compressed cache takes before it is compressed back to the budget
            (``1`` = every step, as in the papers; larger amortises the compression cost); ``None`` means
            ``64``. It only means something for a compressed cache, so giving it without a ``kv_budget`` is an
            error (you most likely forgot the budget); with ``kv_budget=1.0`` (the full cache) it is ignored.
        prefill_compression: ``"chunked"`` (``None``, the default: the prompt is compressed whenever ``budget +
            chunk`` slots fill, so the cache never holds more than that) or ``"once"`` (the whole prompt is kept
            through prefill and compressed once at its end, as the papers' code does: more memory during prefill,
            every kept entry chosen by the prompt's last queries). Only for a compressed cache.
        method_options: the method's hyper-parameters (e.g. ``window=32``, ``variant="zip"``); unknown ones
            are an error that lists the allowed ones.
        revision: hub revision to pin when downloading; ``local_files_only``: never touch the network.
        tp: tensor parallelism over this many processes (each started by torchrun, each calling ``load`` with the
            same arguments): every rank keeps its share of the heads and MLP columns and its own KV heads
            (:mod:`keepkv.distributed.tp`); ``1`` (default) is one process.
        runtime: a :class:`keepkv.runtime.RuntimeOptions` (kernel choices, cache capacity rounding, compile
            limits; how the model runs, not what it computes), set once for this model; ``None`` = the defaults.
    Nothing is half-loaded: every check (arguments first, then config, tensor names and shapes, finite weights,
    tokenizer) passes before a model is returned, or a :class:`KeepKVError` says what is wrong. The arguments are
    checked before anything is read or downloaded.
    """
    method, method_object = resolve_method(method, kv_budget, method_options)
    decode_slack = check_load_arguments(name_or_path, kv_budget, compile=compile,
                                        prefill_chunk_size=prefill_chunk_size, decode_slack=decode_slack,
                                        revision=revision, local_files_only=local_files_only,
                                        prefill_compression=prefill_compression)
    if runtime is not None and not isinstance(runtime, RuntimeOptions):
        raise KeepKVError(f"runtime must be None or a keepkv.runtime.RuntimeOptions, got {shown(runtime)}")
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    if (slow_dtype := slow_cpu_dtype_reason(torch_dtype, torch_device)) is not None:
        log.warning(slow_dtype)
    # -- tensor parallelism (keepkv.distributed): join the ranks first (a CUDA rank's device is its own)
    require_int(tp, "tp", 1)
    tensor_parallel = init_tensor_parallel(tp, torch_device) if tp > 1 else None
    torch_device = tensor_parallel.device if tensor_parallel is not None else torch_device
    # -- end tensor parallelism
    resolved = resolve(name_or_path, revision=revision, local_files_only=local_files_only)
    log.debug("resolved %s -> %s %s", name_or_path, resolved.kind, resolved.path)
    if resolved.kind == "gguf":
        config, state, tokenizer_data = load_gguf(resolved.path, torch_dtype, torch_device)
        tokenizer = Tokenizer.from_gguf(tokenizer_data)
    else:
        config, state = load_hf_folder(resolved.path, torch_dtype, torch_device)
        tokenizer_json = resolved.path / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise KeepKVError(f"{resolved.path} has no tokenizer.json; keepkv needs the fast-tokenizer file")
        tokenizer_config = resolved.path / "tokenizer_config.json"
        tokenizer = Tokenizer.from_file(tokenizer_json, tokenizer_config if tokenizer_config.is_file() else None)
    if resolved.config_overrides:
        config = config.replace(**resolved.config_overrides)
    network = build_transformer(config, state, torch_device)
    if tensor_parallel is not None:  # keep this rank's heads and MLP columns (keepkv.distributed.tp)
        del state
        shard_network(network, tensor_parallel)
    if resolved.entry is not None:
        name = resolved.entry.name
    else:
        name = resolved.hub_repo or Path(name_or_path).name
    return LanguageModel(
        network, tokenizer, name=name, source=str(resolved.path), method=method, kv_budget=kv_budget,
        compile=compile, prefill_chunk_size=prefill_chunk_size, method_object=method_object,
        decode_slack=decode_slack, prefill_compression=prefill_compression or "chunked",
        runtime=runtime if runtime is not None else DEFAULT_RUNTIME,
    )
