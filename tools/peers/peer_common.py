"""Helpers shared by the peer scripts that run INSIDE a peer venv (``hf_decode.py``, ``kvpress_eval.py``).

Imports only the standard library, torch and transformers (never keepkv: the peer venvs do not have it).

- :func:`read_prompt_ids`: the prompt token ids written by keepkv's side (``{"input_ids": [...], ...}``), so both
  sides run on identical tokens;
- :func:`load_gguf`: a GGUF file through ``transformers`` (``gguf_file=``; transformers dequantizes every tensor
  to float32, then the model is cast to ``dtype``);
- :func:`median`, :func:`versions`, :func:`emit`.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def read_prompt_ids(path: str | Path) -> list[int]:
    """Token ids from a prompt-ids JSON file ``{"input_ids": [int, ...], ...}``; a clear error otherwise."""
    data = json.loads(Path(path).read_text())
    ids = data.get("input_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise SystemExit(f"{path}: expected a JSON object with a non-empty list of non-negative integers under "
                         f"'input_ids'")
    return ids


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SystemExit(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def load_gguf(gguf: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """``AutoModelForCausalLM`` from a GGUF file (dequantized to float32 by transformers, then cast), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(gguf)
    if not path.is_file():
        raise SystemExit(f"GGUF file not found: {path}")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation=attn_implementation
    )
    config = model.config
    if getattr(config, "head_dim", None) is None:
        # transformers' GGUF import leaves Qwen2Config without head_dim; kvpress's CriticalKV press reads it
        config.head_dim = config.hidden_size // config.num_attention_heads
    return model.to(torch_dtype(dtype)).eval()


def load_gguf_tokenizer(gguf: str | Path):
    from transformers import AutoTokenizer

    path = Path(gguf)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def versions() -> dict:
    import torch
    import transformers

    out = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "python": sys.version.split()[0], "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    try:
        from importlib.metadata import version

        import kvpress  # noqa: F401

        out["kvpress_version"] = version("kvpress")
    except ImportError:
        pass
    return out


def emit(payload: dict) -> None:
    """One JSON line on stdout (the protocol of ``--serve`` mode and the final result of one-shot mode)."""
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def serve_requests(info: dict, handle) -> int:
    """Worker mode (``--serve``): print ``{"ready": true, **info}``, then answer one JSON request per stdin line
    with ``handle(request) -> dict`` (printed as one JSON line) until ``{"cmd": "quit"}`` or end of input."""
    emit({"ready": True, **info})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("cmd") == "quit":
            break
        emit(handle(request))
    return 0
