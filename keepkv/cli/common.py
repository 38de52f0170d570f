"""What several ``keepkv`` subcommands share: the model options (``generate``, ``chat``, ``info``, ``serve``), the
sampling options, argparse value types that name the allowed range, UTF-8 input checks and loading the model."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

from keepkv.errors import KeepKVError
from keepkv.logs import get_logger

MAX_SEED = 2**64 - 1
log = get_logger("keepkv.cli")


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """The model to load and how: name or path, dtype, device, method, budget, options, compile, chunking."""
    parser.add_argument("model", nargs=None if model_required else "?", help="a known model name (see `keepkv "
                        "info --list`), a hub repo id, a local Hugging Face folder (config.json + *.safetensors + "
                        "tokenizer.json) or a .gguf file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache dtype (default: float32)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--method", default=None, help="KV-cache method (default: keepkv when --kv-budget is "
                        "given, else full)")
    parser.add_argument("--kv-budget", type=budget, default=None, metavar="BUDGET", help="KV budget: a fraction "
                        "of the prompt in (0, 1] (0.1 keeps 10%%) or an integer number of entries per KV head")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", type=method_option,
                        help="a method hyper-parameter, repeatable (e.g. --method-option variant=minnorm "
                        "--method-option window=64); unknown keys are refused with the allowed list")
    parser.add_argument("--decode-slack", type=integer(1), default=None, metavar="W", help="W: new tokens a "
                        "compressed cache takes before it is compressed back to its budget (1 = every step; default "
                        "64; needs --kv-budget)")
    parser.add_argument("--prefill-compression", choices=("chunked", "once"), default=None, help="chunked "
                        "(default): compress whenever budget + chunk slots fill; once: keep the whole prompt and "
                        "compress once after it (more prefill memory; needs --kv-budget)")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile); slower decode "
                        "but no compile time")
    parser.add_argument("--prefill-chunk-size", type=integer(1), default=None, metavar="N", help="prompt tokens per "
                        "prefill forward (bounds activation memory; default: automatic, up to 2048, and a "
                        "compressed cache compresses whenever budget + that many slots fill)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to pin")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """``--max-new-tokens`` (default ``max_new_tokens``), ``--temperature``, ``--top-k``, ``--top-p``, ``--seed``."""
    parser.add_argument("--max-new-tokens", type=integer(1), default=max_new_tokens, metavar="N",
                        help=f"upper bound on generated tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=number(0.0), default=0.0, metavar="T",
                        help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=integer(1), default=None, metavar="K",
                        help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=number(0.0, 1.0, low_inclusive=False), default=None, metavar="P",
                        help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=integer(0, MAX_SEED, "an integer in [0, 2**64)"), default=None,
                        help="random seed for sampling")


def budget(text: str) -> float | int:
    """``--kv-budget``: a fraction in (0, 1] (float) or a whole number of entries >= 1 (int; ``1`` is ``1.0``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0.0 < value <= 1.0 or (math.isfinite(value) and value.is_integer() and value >= 1)):
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1] (0.1 keeps 10%) or an integer >= 1 (entries per KV head), got {text!r}"
        )
    return int(value) if value.is_integer() and value > 1 else value


def integer(low: int, high: int | None = None, allowed: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a base-10 integer in ``[low, high]``; anything else is a usage error naming the
    allowed range (argparse prefixes the flag)."""
    allowed = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def number(low: float, high: float | None = None, low_inclusive: bool = True) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= low`` (``> low`` unless ``low_inclusive``) and ``<= high``."""
    lower = f"{'>=' if low_inclusive else '>'} {low:g}"
    allowed = f"a number {lower}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        in_range = (value >= low if low_inclusive else value > low) and (high is None or value <= high)
        if not (math.isfinite(value) and in_range):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def method_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as int, float, bool or kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key.replace("-", "_"), parse(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key.replace("-", "_"), raw.lower() == "true"
    return key.replace("-", "_"), raw


def load_model(args: argparse.Namespace):
    """The model of :func:`add_model_arguments`' options (``args.tp`` ranks when the command has ``--tp``)."""
    from keepkv.models import load

    started = time.perf_counter()
    model = load(args.model, kv_budget=args.kv_budget, method=args.method, dtype=args.dtype, device=args.device,
                 compile=not args.no_compile, prefill_chunk_size=args.prefill_chunk_size, revision=args.revision,
                 decode_slack=args.decode_slack, prefill_compression=args.prefill_compression,
                 tp=getattr(args, "tp", 1), **dict(args.method_option))
    log.info("loaded %r in %.1fs", model, time.perf_counter() - started)
    return model


def decoded(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped); other encodings are refused, naming ``source``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise KeepKVError(
            f"{source} is not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start} cannot be decoded; "
            "save it as UTF-8"
        ) from None
