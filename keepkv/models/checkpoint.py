"""Checkpoint files -> ``(ModelConfig, {Hugging Face parameter name: tensor})``: safetensors and GGUF, nothing else.

Two sources, one result. A Hugging Face folder (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``) already uses the parameter names of :mod:`keepkv.models.transformer`. A GGUF file
(llama.cpp) is renamed (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``), dequantized to float
and, for the llama architecture, has the row permutation llama.cpp applies to q/k undone (see
:func:`unpermute_rope_rows`).

Pickle checkpoints (``.bin``, ``.pt`` ...) are refused: unpickling runs arbitrary code.

Every loader validates before it returns: each tensor :func:`expected_shapes` lists is present with that shape,
and a truncated or corrupt file is reported as such. Nothing is returned half-loaded: a loader returns everything
or raises :class:`~keepkv.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from keepkv.checks import is_integer, shown
from keepkv.errors import CheckpointError, suggest
from keepkv.logs import progress
from keepkv.models.config import INT_FIELD_LIMITS, ModelConfig
from keepkv.models.gguf_file import GGUFHeader, read_gguf_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_ARCHITECTURES = ("llama", "qwen2")
SAFETENSORS_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_NAMES_IN_MESSAGE = 8
# A config implying more than this many times the weights a checkpoint holds describes another model: refused at
# once (before the per-tensor inventory, which lists the names for smaller gaps).
IMPLAUSIBLE_PARAMETER_RATIO = 2

# GGUF tensor names -> Hugging Face names. Per-layer names map ``blk.{i}.<gguf>`` -> ``model.layers.{i}.<hf>``.
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")
GGUF_ROPE_FACTORS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (Llama-3.1 scaling)

# llama.cpp marks the end of generation with the eos token and also with these, whatever the eos id says.
END_OF_GENERATION_TEXTS = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
    "<｜end▁of▁sentence｜>",
)
GGUF_CONTROL_TOKEN_TYPE = 3


@dataclass(frozen=True)
class GGUFTokenizerData:
    """The tokenizer a GGUF file describes in its ``tokenizer.*`` metadata, for ``Tokenizer.from_gguf``.

    ``model`` is ``tokenizer.ggml.model`` (``"gpt2"`` = byte-level BPE), ``pre`` the pre-tokenizer name llama.cpp
    uses (``"qwen2"``, ``"smollm"``, ``"llama-bpe"`` ...; ``None`` when the file predates it). ``tokens[i]`` is the
    text of id ``i`` (byte-level spelling for BPE), ``token_types[i]`` its llama.cpp type (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte), ``merges`` the BPE merges as ``"left right"`` strings.
    ``eos_token_ids`` starts with ``tokenizer.ggml.eos_token_id`` followed by the other end-of-generation tokens
    llama.cpp recognises (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>`` ...). ``source`` is the file.
    """

    source: str
    model: str
    pre: str | None
    tokens: tuple[str, ...] = field(repr=False)
    token_types: tuple[int, ...] = field(repr=False)
    merges: tuple[str, ...] = field(repr=False)
    scores: tuple[float, ...] = field(repr=False)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool | None
    add_space_prefix: bool
    chat_template: str | None = field(repr=False)


# --------------------------------------------------------------------------------------------------------------
# What a checkpoint must hold
# --------------------------------------------------------------------------------------------------------------


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the decoder ``config`` describes, by Hugging Face name, with its shape.

    ``lm_head.weight`` is absent when ``config.tie_word_embeddings`` (the embedding doubles as the output
    projection); q/k/v biases are present only when ``config.attention_bias`` (Qwen2).
    """
    hidden, vocab, inner = config.hidden_size, config.vocab_size, config.intermediate_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "self_attn.q_proj.weight"] = (q_rows, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_rows, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_rows, hidden)
        if config.attention_bias:
            shapes[prefix + "self_attn.q_proj.bias"] = (q_rows,)
            shapes[prefix + "self_attn.k_proj.bias"] = (kv_rows,)
            shapes[prefix + "self_attn.v_proj.bias"] = (kv_rows,)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, q_rows)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes[prefix + "mlp.gate_proj.weight"] = (inner, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (inner, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, inner)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def implied_parameter_count(config: ModelConfig) -> int:
    """How many weights :func:`expected_shapes` lists for ``config``, in closed form (no per-layer loop)."""
    hidden, vocab, inner = config.hidden_size, config.vocab_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = 2 * hidden + 2 * q_rows * hidden + 2 * kv_rows * hidden + 3 * inner * hidden
    if config.attention_bias:
        per_layer += q_rows + 2 * kv_rows
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_layers * per_layer + hidden


def check_parameter_count(config: ModelConfig, present: int, source: str | Path, dtype: torch.dtype) -> None:
    """Refuse a config that implies far more weights than the checkpoint holds (``present`` elements), before any
    per-tensor work or allocation: more than :data:`IMPLAUSIBLE_PARAMETER_RATIO` times means config and weights
    belong to different models (smaller gaps are itemised by :func:`check_tensor_inventory`)."""
    implied = implied_parameter_count(config)
    if implied <= IMPLAUSIBLE_PARAMETER_RATIO * present:
        return
    gib = implied * torch.empty((), dtype=dtype).element_size() / 2**30
    raise CheckpointError(
        f"{source}: its config implies {implied:,} parameters ({gib:,.1f} GiB in {str(dtype).removeprefix('torch.')})"
        f" but the checkpoint holds only {present:,} weights: the config does not describe these weights (check "
        f"num_hidden_layers, hidden_size, intermediate_size, vocab_size and the head counts)"
    )


def _listed(names: Iterable[str]) -> str:
    """``"a, b, c"``, cut to :data:`MAX_NAMES_IN_MESSAGE` names with ``"... and N more"``."""
    names = list(names)
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    return shown + (f" ... and {len(names) - MAX_NAMES_IN_MESSAGE} more" if len(names) > MAX_NAMES_IN_MESSAGE else "")


def check_tensor_inventory(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    source: str | Path,
    file_of_name: Mapping[str, str] | None = None,
) -> None:
    """Raise one :class:`CheckpointError` listing every missing tensor and every shape mismatch, or return.

    ``found`` maps the names the checkpoint holds to their shapes; names it holds beyond ``expected`` are ignored.
    ``source`` names the checkpoint; ``file_of_name`` (sharded checkpoints) adds the shard of each mismatch.
    """
    missing = [name for name in expected if name not in found]
    mismatched = [
        f"{name}" + (f" in {file_of_name[name]}" if file_of_name and name in file_of_name else "")
        + f": expected {tuple(shape)}, found {tuple(found[name])}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    if not missing and not mismatched:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listed(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
    raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def refuse_pickle(path: str | Path) -> None:
    """Raise :class:`CheckpointError` if ``path`` is a pickle checkpoint (``.bin .pt .pth .ckpt .pkl``).

    Unpickling can run arbitrary code, so keepkv never loads these; the message says what to use instead.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint ({path.suffix}); pickle checkpoints are not loaded because unpickling "
            "can run arbitrary code. keepkv requires safetensors (a Hugging Face folder with *.safetensors) or GGUF"
        )


# --------------------------------------------------------------------------------------------------------------
# Hugging Face folder: config.json + safetensors
# --------------------------------------------------------------------------------------------------------------


def load_hf_folder(
    folder: str | Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read a Hugging Face model folder: ``config.json`` plus safetensors weights cast to ``dtype`` on ``device``.

    Weights come from ``model.safetensors.index.json`` (sharded; every shard it names must lie inside the folder),
    else ``model.safetensors``, else unindexed ``model*.safetensors`` shards. Headers are read and checked against
    the config (:func:`check_parameter_count`, then :func:`expected_shapes`) before any tensor data is; extra
    tensors (``rotary_emb.inv_freq``, a tied ``lm_head.weight``) are ignored. Every loaded tensor must be finite.
    """
    folder = Path(folder)
    refuse_pickle(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; expected a Hugging Face model folder with config.json")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; a Hugging Face model folder needs config.json")
    config = ModelConfig.from_hf_file(config_path)
    index = _read_weight_index(folder)
    weight_files = sorted(set(index.values())) if index is not None else _unindexed_weight_files(folder)
    headers = {file: _read_safetensors_header(file) for file in weight_files}
    where = str(weight_files[0]) if len(weight_files) == 1 else f"{folder} (safetensors shards)"
    present = sum(math.prod(shape) for header in headers.values() for shape, _ in header.values())
    check_parameter_count(config, present, where, dtype)
    expected = expected_shapes(config)
    if index is not None:
        file_of_name = {name: file for name, file in index.items() if name in expected}
    else:
        file_of_name = {name: file for file, header in headers.items() for name in header if name in expected}
    found = {name: headers[file][name][0] for name, file in file_of_name.items() if name in headers[file]}
    check_tensor_inventory(expected, found, where, {name: file.name for name, file in file_of_name.items()})
    _check_float_dtypes({name: headers[file_of_name[name]][name][1] for name in expected}, file_of_name)
    return config, _read_safetensors_tensors(expected, file_of_name, dtype, device)


def _read_weight_index(folder: Path) -> dict[str, Path] | None:
    """``{tensor name: shard file}`` from ``model.safetensors.index.json``, or ``None`` when there is no index.

    Every shard must be a relative path inside ``folder`` (:func:`_confined_shard`) and exist.
    """
    index_path = folder / "model.safetensors.index.json"
    if not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} is corrupt: no readable weight_map ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map):
        raise CheckpointError(f"{index_path} is corrupt: weight_map must map tensor names to shard files, got "
                              f"{shown(weight_map)}")
    files = {name: _confined_shard(folder, shard, index_path) for name, shard in weight_map.items()}
    absent = sorted({str(file) for file in files.values() if not file.is_file()})
    if absent:
        raise CheckpointError(f"{index_path} lists shard(s) that are missing from the folder: {_listed(absent)}")
    return files


def _confined_shard(folder: Path, shard: Any, index_path: Path) -> Path:
    """``folder / shard`` for a shard named by the index; a name that could reach outside the folder (absolute,
    a drive, a ``..`` component) or is not a string is a :class:`CheckpointError`. The check is on the name, not
    the resolved path: a hub snapshot's shards are symlinks into its blob store, which is fine."""
    if not isinstance(shard, str) or not shard.strip():
        raise CheckpointError(f"{index_path}: a shard must be a file name in the folder, got {shown(shard)}")
    posix, windows = PurePosixPath(shard.replace("\\", "/")), PureWindowsPath(shard)
    if posix.is_absolute() or windows.drive or windows.root or ".." in posix.parts:
        raise CheckpointError(
            f"{index_path} points outside the model folder: shard {shard!r}; shard paths must be relative to the "
            "folder, without '..', a leading '/' or a drive"
        )
    return folder / posix


def _unindexed_weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, else every ``model*.safetensors``; only pickle weights, or none, is an error."""
    single = folder / "model.safetensors"
    weight_files = [single] if single.is_file() else sorted(folder.glob("model*.safetensors"))
    if not weight_files:
        _raise_no_weights(folder)
    return weight_files


def _raise_no_weights(folder: Path) -> NoReturn:
    """The folder has no safetensors weights: say whether it holds (refused) pickle weights or none at all."""
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({_listed(pickles)}); pickle checkpoints are not loaded because "
            "unpickling can run arbitrary code. keepkv requires safetensors (model.safetensors or a sharded "
            "model.safetensors.index.json) or GGUF"
        )
    raise CheckpointError(
        f"{folder} has no weights: expected model.safetensors or model.safetensors.index.json with its shards"
    )


def _read_safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype string)}`` from a safetensors header; a truncated or corrupt file is an error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            views = {name: handle.get_slice(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
            return {name: (tuple(view.get_shape()), view.get_dtype()) for name, view in views.items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is truncated or corrupt: not a readable safetensors file ({err})") from None


def _check_float_dtypes(stored_dtypes: Mapping[str, str], file_of_name: Mapping[str, Path]) -> None:
    """Every needed tensor must be stored as a float; integer storage means a quantized format keepkv cannot cast."""
    not_float = [name for name, kind in stored_dtypes.items() if kind not in SAFETENSORS_FLOAT_DTYPES]
    if not_float:
        files = sorted({str(file_of_name[name]) for name in not_float})
        described = [f"{name} ({stored_dtypes[name]})" for name in not_float]
        raise CheckpointError(
            f"{_listed(files)}: tensors stored in non-float dtypes, which keepkv cannot cast to model weights: "
            f"{_listed(described)}; allowed: {', '.join(SAFETENSORS_FLOAT_DTYPES)}"
        )


def _read_safetensors_tensors(
    names: Iterable[str], file_of_name: Mapping[str, Path], dtype: torch.dtype, device: torch.device | str
) -> dict[str, Tensor]:
    """Read ``names`` from their (memory-mapped) files, each cast straight to ``dtype`` on ``device``."""
    from safetensors import SafetensorError, safe_open

    names_by_file: dict[Path, list[str]] = {}
    for name in names:
        names_by_file.setdefault(file_of_name[name], []).append(name)
    tensors = {}
    for file, file_names in names_by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in progress(file_names, desc=f"loading {file.name}", unit="tensor"):  # tqdm on a terminal
                    tensors[name] = require_finite(handle.get_tensor(name).to(device=device, dtype=dtype), name, file)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file} is truncated or corrupt: reading its tensors failed ({err})") from None
    return tensors


def require_finite(tensor: Tensor, name: str, source: str | Path) -> Tensor:
    """``tensor`` if it holds no NaN or infinity, else a :class:`CheckpointError` naming it and ``source``.

    Cheap: one float32 sum decides (NaN and infinities make it non-finite); only a non-finite sum, which a huge
    but finite tensor could also give, pays for the exact element check.
    """
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return tensor
    non_finite = int((~torch.isfinite(tensor)).sum())
    if non_finite:
        raise CheckpointError(
            f"{source}: tensor {name} holds {non_finite:,} NaN or infinite value(s) out of {tensor.numel():,}; the "
            "checkpoint is corrupt (every weight must be a finite number)"
        )
    return tensor


# --------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# --------------------------------------------------------------------------------------------------------------


def load_gguf(
    path: str | Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[ModelConfig, dict[str, Tensor], GGUFTokenizerData]:
    """Read a llama.cpp GGUF file (``llama`` or ``qwen2`` architecture): config, float weights and tokenizer data.

    The config comes from the ``{arch}.*`` metadata, the vocabulary size from the token list; embeddings are tied
    when the file has no ``output.weight``. Names and shapes are checked against :func:`expected_shapes` before
    anything is dequantized. Each tensor is then dequantized on its own (``gguf.quants.dequantize``), converted to
    ``dtype`` on ``device`` at once and its float32 copy dropped, so peak memory stays near the final model's.
    """
    path = _existing_gguf_path(path)
    with _gguf_read_errors(path):
        return _load_gguf_contents(_open_gguf(path), path, dtype, device)


def read_gguf_tokenizer_data(path: str | Path) -> GGUFTokenizerData:
    """Only the tokenizer metadata of a GGUF file, without dequantizing any tensor (for tools and tests)."""
    path = _existing_gguf_path(path)
    with _gguf_read_errors(path):
        return gguf_tokenizer_data(GGUFMetadata(_open_gguf(path), path))


def _existing_gguf_path(path: str | Path) -> Path:
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; expected a .gguf file")
    return path


@contextmanager
def _gguf_read_errors(path: Path) -> Iterator[None]:
    """Report what the gguf library and numpy raise on a damaged file as a :class:`CheckpointError` naming it.

    The header is parsed eagerly; a file cut short fails there (``EOFError``, or numpy's ``cannot mmap an empty
    file``), before any tensor is used.
    """
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, IndexError, TypeError, OSError, EOFError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt: not a readable GGUF file ({type(err).__name__}: {err})"
        ) from None


def _open_gguf(path: Path) -> GGUFHeader:
    """``path``'s metadata and memory-mapped tensor index (:func:`keepkv.models.gguf_file.read_gguf_header`)."""
    return read_gguf_header(path)


def _load_gguf_contents(
    reader, path: Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[ModelConfig, dict[str, Tensor], GGUFTokenizerData]:
    """The body of :func:`load_gguf` once the file is open: metadata -> config, checks, then tensors."""
    metadata = GGUFMetadata(reader, path)
    arch = metadata.require("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{path} has architecture {arch!r}; keepkv loads GGUF files of architecture "
            f"{', '.join(GGUF_ARCHITECTURES)}.{suggest(str(arch), GGUF_ARCHITECTURES)}"
        )
    tokenizer_data = gguf_tokenizer_data(metadata)
    tensors, rope_factors = _gguf_tensors_by_hf_name(reader.tensors, path)
    config = _gguf_config(metadata, arch, tokenizer_data, tensors, rope_factors)
    check_parameter_count(config, sum(int(np.prod(tensor.shape)) for tensor in reader.tensors), path, dtype)
    expected = expected_shapes(config)
    check_tensor_inventory(expected, {name: _hf_shape(tensor) for name, tensor in tensors.items()}, path)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path} holds tensors keepkv's {arch} decoder has no place for: {_listed(unexpected)}")
    _check_quantization_types(tensors.values(), path)
    state = {
        name: require_finite(_gguf_tensor_to_torch(tensors[name], name, config, dtype, device), name, path)
        for name in progress(expected, desc=f"dequantising {path.name}", unit="tensor")  # tqdm on a terminal
    }
    return config, state, tokenizer_data


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name the file and the key."""

    def __init__(self, header: GGUFHeader, path: Path) -> None:
        self.fields = header.fields
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.path} lacks the GGUF metadata key {key!r}, which keepkv needs")
        return self.fields[key]

    def optional_int(self, key: str, low: int | None = None, high: int | None = None) -> int | None:
        """The integer at ``key`` (``None`` when absent) within ``[low, high]``; anything else names the key."""
        value = self.get(key)
        if value is None:
            return None
        if not is_integer(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise CheckpointError(f"{self.path}: GGUF metadata {key} must be an integer{bounds}, got {shown(value)}")
        return int(value)

    def require_int(self, key: str, low: int | None = None, high: int | None = None) -> int:
        """:meth:`optional_int` of a key that must be present."""
        self.require(key)
        return self.optional_int(key, low, high)


def gguf_tokenizer_data(metadata: GGUFMetadata) -> GGUFTokenizerData:
    """Collect the ``tokenizer.*`` metadata; end-of-generation ids follow llama.cpp (eos, eot, eom, then by text)."""
    tokens = tuple(metadata.require("tokenizer.ggml.tokens"))
    token_types = tuple(int(kind) for kind in metadata.get("tokenizer.ggml.token_type", ()))
    if token_types and len(token_types) != len(tokens):
        raise CheckpointError(
            f"{metadata.path} is corrupt: {len(tokens)} tokens but {len(token_types)} token types"
        )
    eos_ids = [metadata.optional_int(key) for key in (
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    control = [i for i, kind in enumerate(token_types) if kind == GGUF_CONTROL_TOKEN_TYPE]
    eos_ids += [i for i in control if tokens[i] in END_OF_GENERATION_TEXTS]
    eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None and 0 <= i < len(tokens)))
    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    return GGUFTokenizerData(
        source=str(metadata.path),
        model=str(metadata.require("tokenizer.ggml.model")),
        pre=metadata.get("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=token_types,
        merges=tuple(metadata.get("tokenizer.ggml.merges", ())),
        scores=tuple(float(score) for score in metadata.get("tokenizer.ggml.scores", ())),
        bos_token_id=metadata.optional_int("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_token_ids,
        pad_token_id=metadata.optional_int("tokenizer.ggml.padding_token_id"),
        unk_token_id=metadata.optional_int("tokenizer.ggml.unknown_token_id"),
        add_bos_token=None if add_bos is None else bool(add_bos),
        add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _gguf_tensors_by_hf_name(gguf_tensors, path: Path) -> tuple[dict[str, Any], Any | None]:
    """``({Hugging Face name: gguf ReaderTensor}, rope_freqs tensor or None)``; unknown GGUF names are an error."""
    tensors, unknown, rope_factors = {}, [], None
    for tensor in gguf_tensors:
        if tensor.name == GGUF_ROPE_FACTORS:
            rope_factors = tensor
            continue
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            unknown.append(tensor.name)
        else:
            tensors[hf_name] = tensor
    if unknown:
        raise CheckpointError(f"{path} holds tensors keepkv does not know how to place: {_listed(unknown)}")
    return tensors, rope_factors


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """``"blk.3.attn_q.weight"`` -> ``"model.layers.3.self_attn.q_proj.weight"``; ``None`` for an unknown name."""
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    match = GGUF_LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def _hf_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in PyTorch order: GGUF lists dimensions fastest first (``[in, out]``)."""
    return tuple(int(dim) for dim in reversed(tensor.shape))


def _gguf_config(
    metadata: GGUFMetadata, arch: str, tokenizer_data: GGUFTokenizerData, tensors: Mapping[str, Any], rope_factors
) -> ModelConfig:
    """A :class:`ModelConfig` from ``{arch}.*`` metadata; tie/bias flags from which tensors the file holds."""
    hidden = metadata.require_int(f"{arch}.embedding_length", *INT_FIELD_LIMITS["hidden_size"])
    num_heads = metadata.require_int(f"{arch}.attention.head_count", *INT_FIELD_LIMITS["num_heads"])
    num_kv_heads = _uniform_int(metadata, f"{arch}.attention.head_count_kv", default=num_heads)
    head_dim = metadata.optional_int(f"{arch}.attention.key_length", 0) or hidden // num_heads
    value_dim = metadata.optional_int(f"{arch}.attention.value_length", 0) or head_dim
    rotary_dim = metadata.optional_int(f"{arch}.rope.dimension_count", 0) or head_dim
    if value_dim != head_dim or rotary_dim != head_dim:
        raise CheckpointError(
            f"{metadata.path}: key length {head_dim}, value length {value_dim} and rotary dimension {rotary_dim} "
            "differ; keepkv's decoder needs them equal"
        )
    rope_theta = _decimal_float(metadata.get(f"{arch}.rope.freq_base", 10000.0))
    fields = dict(
        arch=arch,
        vocab_size=len(tokenizer_data.tokens),
        hidden_size=hidden,
        intermediate_size=metadata.require_int(f"{arch}.feed_forward_length", *INT_FIELD_LIMITS["intermediate_size"]),
        num_layers=metadata.require_int(f"{arch}.block_count", *INT_FIELD_LIMITS["num_layers"]),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=_gguf_rope_scaling(metadata, arch, rope_theta, head_dim, rope_factors),
        rms_norm_eps=_decimal_float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=metadata.optional_int(f"{arch}.context_length", 1) or 4096,
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        bos_token_id=tokenizer_data.bos_token_id,
        eos_token_ids=tokenizer_data.eos_token_ids,
        pad_token_id=tokenizer_data.pad_token_id,
    )
    try:
        return ModelConfig(**fields)
    except CheckpointError as err:  # ModelConfig checks the rest; say which file
        raise CheckpointError(f"{metadata.path}: {err}") from None


def _decimal_float(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (``1e-05``, not ``9.999999747378752e-06``)."""
    return float(str(np.float32(value)))


def _uniform_int(metadata: GGUFMetadata, key: str, default: int) -> int:
    """An integer that llama.cpp may store per layer (an array): all layers must agree."""
    value = metadata.get(key, default)
    values = {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
    if len(values) != 1:
        raise CheckpointError(f"{metadata.path}: {key} varies across layers ({sorted(values)}); keepkv needs one value")
    return values.pop()


def _gguf_rope_scaling(
    metadata: GGUFMetadata, arch: str, rope_theta: float, head_dim: int, rope_factors
) -> dict[str, Any] | None:
    """RoPE scaling as a ``ModelConfig.rope_scaling`` dict, or ``None``.

    ``{arch}.rope.scaling.type = linear`` gives linear scaling. Llama-3.1 files instead carry a ``rope_freqs``
    tensor of per-frequency divisors; it is read as ``llama3`` scaling with ``factor = max(divisors)`` and the
    Llama-3.1 band (low 1, high 4, original context ``rope.scaling.original_context_length`` or 8192), accepted only
    if those parameters reproduce every divisor. Other scalings (YaRN ...) are refused rather than ignored.
    """
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(metadata.require(f"{arch}.rope.scaling.factor"))}
    if kind not in ("none", ""):
        raise CheckpointError(f"{metadata.path} uses RoPE scaling {kind!r}; keepkv supports none, linear and llama3")
    if rope_factors is None:
        return None
    import gguf

    divisors = np.asarray(gguf.quants.dequantize(rope_factors.data, rope_factors.tensor_type), dtype=np.float64)
    divisors = divisors.reshape(-1)
    if np.allclose(divisors, 1.0):
        return None
    original = metadata.optional_int(f"{arch}.rope.scaling.original_context_length") or 8192
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    predicted = llama3_rope_divisors(rope_theta, head_dim, scaling)
    if predicted.shape != divisors.shape or not np.allclose(predicted, divisors, rtol=1e-3):
        raise CheckpointError(
            f"{metadata.path}: its rope_freqs tensor does not match Llama-3.1 (llama3) RoPE scaling; keepkv cannot "
            "reproduce these per-frequency factors"
        )
    return scaling


def llama3_rope_divisors(rope_theta: float, head_dim: int, scaling: Mapping[str, Any]) -> np.ndarray:
    """By how much ``llama3`` RoPE scaling divides each base frequency (llama.cpp's ``rope_freqs`` values).

    Wavelengths below ``original / high_freq_factor`` keep their frequency (divisor 1), those above
    ``original / low_freq_factor`` are divided by ``factor``, and the band between is interpolated smoothly.
    """
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    band = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, band))


def _check_quantization_types(tensors: Iterable[Any], path: Path) -> None:
    """Dequantize one row of each storage type up front, so an unsupported type fails before the long work."""
    import gguf

    first_of_type = {}
    for tensor in tensors:
        first_of_type.setdefault(tensor.tensor_type, tensor)
    for kind, tensor in first_of_type.items():
        sample = tensor.data[:1] if tensor.data.ndim > 1 else tensor.data  # one row of blocks, or a small vector
        try:
            gguf.quants.dequantize(sample, kind)
        except (NotImplementedError, gguf.quants.QuantError) as err:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} is stored as {kind.name}, which the gguf library cannot dequantize "
                f"({err})"
            ) from None


def _gguf_tensor_to_torch(tensor, hf_name: str, config: ModelConfig, dtype: torch.dtype, device) -> Tensor:
    """Dequantize one GGUF tensor into a ``dtype`` tensor on ``device``, in Hugging Face layout.

    For ``llama`` files the q/k rows (and biases, if any) are un-permuted; ``qwen2`` files are stored unpermuted.
    """
    import gguf

    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if not array.flags.writeable or np.may_share_memory(array, tensor.data):
        array = np.array(array, dtype=np.float32)  # a view of the memory-mapped file: own the bytes
    weight = torch.from_numpy(array.reshape(_hf_shape(tensor))).to(device=device, dtype=dtype)
    del array
    if config.arch == "llama" and ".q_proj." in hf_name:
        weight = unpermute_rope_rows(weight, config.num_heads)
    elif config.arch == "llama" and ".k_proj." in hf_name:
        weight = unpermute_rope_rows(weight, config.num_kv_heads)
    return weight


def unpermute_rope_rows(weight: Tensor, num_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation, giving the Hugging Face rotate-half layout.

    llama.cpp's ``llama`` architecture applies RoPE to adjacent pairs ``(x[2j], x[2j+1])`` of each head; Hugging
    Face rotates ``(x[j], x[j + d/2])``. Its converter therefore reorders each head's rows from ``[first half;
    second half]`` to interleaved ``[r0, r(d/2), r1, r(d/2+1), ...]``. Reading the interleaved rows as
    ``[d/2, 2]`` and transposing to ``[2, d/2]`` restores the halves. Works for weights ``[rows, in]`` and
    biases ``[rows]``.
    """
    rows, trailing = weight.shape[0], tuple(weight.shape[1:])
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *trailing)
    return per_head.transpose(1, 2).reshape(rows, *trailing).contiguous()
