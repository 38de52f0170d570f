"""Shared fixtures: tiny Hugging Face checkpoints written to disk, and the real offline GGUF models.

The real models are installed by ``make test`` (``keepkv download --offline-assets all``). Outside CI a missing
asset skips its tests; in CI (``CI=true``) it fails them, so a broken install step cannot hide behind skips.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI (and `make test`, which sets KEEPKV_DERANDOMIZE) draws the same examples on every run (a red CI is then
# reproducible, never a lucky draw); a plain `pytest` explores new examples each run and keeps failures in
# .hypothesis/ (a failure found that way becomes an @example of its test).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") or os.environ.get("KEEPKV_DERANDOMIZE") else "default")

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "inductor"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TINY_VOCAB = 128


def write_tiny_tokenizer(folder: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A word-level ``tokenizer.json`` over tokens ``t0 .. t{n-1}`` (whitespace split), ids = their index."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "pad_token": "t0"}))


def require_asset(path: Path | None, what: str) -> Path:
    if path is not None and path.exists():
        return path
    message = f"{what} is not installed (run `keepkv download --offline-assets all`)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _restore_keepkv_logging():
    """The command line configures the process-wide ``keepkv`` logger (``keepkv.logs.configure_cli_logging``);
    each test starts from, and leaves, the library's own state (a NullHandler, no level, propagating)."""
    logger = logging.getLogger("keepkv")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from keepkv.assets import offline_asset_path

    return require_asset(offline_asset_path("smollm2"), "the SmolLM2-135M-Instruct GGUF")


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    from keepkv.assets import offline_asset_path

    return require_asset(offline_asset_path("qwen2.5-coder"), "the Qwen2.5-Coder-0.5B-Instruct GGUF")


@pytest.fixture(scope="session")
def smollm2_eager(smollm2_gguf):
    """The real SmolLM2 in float32, eager (dense reference attention): loaded once per session."""
    from keepkv.models import load

    return load(smollm2_gguf, compile=False, device="cpu")


@pytest.fixture(scope="session")
def qwen_eager(qwen_gguf):
    """The real Qwen2.5-Coder-0.5B in float32, eager: loaded once per session (about 2 GB)."""
    from keepkv.models import load

    return load(qwen_gguf, compile=False, device="cpu")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """Hugging Face transformers' SmolLM2 from the same GGUF (float32, eval; a test-only reference): parsed once
    per session (transformers' GGUF reader takes most of half a minute). Tests that change it restore it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread (synchronisation would dominate, and the box may be shared); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(arch: str = "llama", **overrides):
    """A small random-weight decoder config (2 layers, GQA 4/2, head_dim 16)."""
    from keepkv.models.config import ModelConfig

    fields = dict(arch=arch, vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=4096, eos_token_ids=(2,))
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_network(config=None, seed: int = 0, dtype=torch.float32):
    """A :class:`Transformer` with random weights (std 0.2 so attention is far from uniform)."""
    from keepkv.models.transformer import Transformer, build_transformer

    config = config or tiny_config()
    torch.manual_seed(seed)
    reference = Transformer(config)
    state = {}
    for name, tensor in reference.state_dict().items():
        state[name] = (torch.randn_like(tensor) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0)).to(dtype)
    return build_transformer(config, state, torch.device("cpu"))
