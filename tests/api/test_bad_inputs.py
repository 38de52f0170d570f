"""Every bad input is a clear :class:`KeepKVError` raised before any heavy work (issue 14).

One table per entry point: config fields, checkpoint files, ``load()`` arguments, generation arguments, method
options, and the command line. Each row asserts the error type and that the message names what was wrong. The
``load()`` rows use a model name that does not exist, with the resolver patched to fail loudly: an argument error
that surfaced only after the model was looked up (or loaded) would fail the test. Generation rows patch the engine
the same way, so a check that ran only after prefill would fail too.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from keepkv.cache.methods import make_method
from keepkv.cli import main
from keepkv.errors import CheckpointError, KeepKVError
from keepkv.models import load
from keepkv.models.checkpoint import expected_shapes, implied_parameter_count, load_hf_folder
from keepkv.models.config import ModelConfig
from keepkv.models.registry import get_model
from keepkv.models.tokenizer import Tokenizer
from keepkv.sampling import SamplingConfig
from tests.conftest import tiny_config, write_tiny_tokenizer

KEEPKV_SCRIPT = Path(sys.executable).with_name("keepkv")
NO_SUCH_MODEL = "no-such-model-for-argument-tests"


# ---- fixtures ---------------------------------------------------------------------------------------------------
def hf_config(config: ModelConfig) -> dict:
    """The config.json a Hugging Face export of ``config`` would hold."""
    return {
        "model_type": config.arch, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "eos_token_id": 2, "pad_token_id": 0,
    }


def write_folder(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A Hugging Face folder for ``config``: config.json, random weights (or ``state``), a tiny tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config)))
    if state is None:
        generator = torch.Generator().manual_seed(0)
        state = {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in expected_shapes(config).items()}
    save_file(state, str(folder / "model.safetensors"))
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny"), tiny_config(max_position_embeddings=256))


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return load(tiny_folder, compile=False, device="cpu")


@pytest.fixture
def engine_must_not_run(tiny_model, monkeypatch):
    """Make any prefill / decode fail: argument errors must come before the engine starts."""
    def started(*args, **kwargs):
        raise AssertionError("the engine started before the arguments were checked")

    monkeypatch.setattr(tiny_model.engine, "generate_tokens", started)
    return tiny_model


@pytest.fixture
def resolve_must_not_run(monkeypatch):
    """Make model lookup fail: ``load()`` argument errors must come before anything is resolved or read."""
    def resolved(*args, **kwargs):
        raise AssertionError("load() resolved the model before checking its arguments")

    monkeypatch.setattr("keepkv.models.loading.resolve", resolved)


# ---- item 3: config fields --------------------------------------------------------------------------------------
CONFIG_JSON_CASES = [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": "4"}, "num_attention_heads"),
    ({"vocab_size": None}, "vocab_size"),
    ({"hidden_size": 64.7}, "hidden_size"),
    ({"hidden_size": True}, "hidden_size"),
    ({"intermediate_size": -96}, "intermediate_size"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"max_position_embeddings": "4096"}, "max_position_embeddings"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_parameters": ["rope_theta", 1e6]}, "rope_parameters"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"bos_token_id": 1.5}, "bos_token_id"),
    ({"model_type": "mistral", "sliding_window": -4096}, "sliding_window"),
    ({"model_type": ["llama"]}, "model_type"),
]


@pytest.mark.parametrize("change,named", CONFIG_JSON_CASES)
def test_config_json_fields_are_checked(change, named):
    hf = {**hf_config(tiny_config()), **change}
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(")):
        ModelConfig.from_hf_dict(hf)


@pytest.mark.parametrize("document", ["[1, 2]", '"llama"', "null"])
def test_config_json_must_be_an_object_and_the_file_is_named(tmp_path, document):
    (tmp_path / "config.json").write_text(document)
    with pytest.raises(CheckpointError, match=r"config\.json.*JSON object"):
        ModelConfig.from_hf_file(tmp_path / "config.json")


@pytest.mark.parametrize("field,value", [
    ("num_heads", 0), ("num_kv_heads", 0), ("hidden_size", 64.7), ("num_layers", True), ("vocab_size", "128"),
    ("rms_norm_eps", float("nan")), ("rope_theta", float("inf")), ("max_position_embeddings", 0),
    ("rope_scaling", "linear"), ("attention_bias", 1), ("head_dim", 3), ("num_layers", 10**9),
])
def test_model_config_fields_are_checked(field, value):
    with pytest.raises(CheckpointError, match=field):
        tiny_config(**{field: value})


def test_llama3_rope_scaling_needs_a_real_band():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    with pytest.raises(CheckpointError, match="high_freq_factor > low_freq_factor"):
        tiny_config(rope_scaling=scaling)
    assert tiny_config(rope_scaling={**scaling, "low_freq_factor": 1.0}).rope_scaling["factor"] == 8.0


def test_good_config_json_still_loads():
    config = ModelConfig.from_hf_dict({**hf_config(tiny_config()), "head_dim": None, "sliding_window": None,
                                       "rope_scaling": {"rope_type": "default"}, "eos_token_id": [2, 3]})
    assert config.head_dim == 16 and config.rope_scaling is None and config.eos_token_ids == (2, 3)


def test_implied_parameter_count_is_the_expected_shapes_total():
    for config in (tiny_config(), tiny_config("qwen2", attention_bias=True, tie_word_embeddings=True)):
        assert implied_parameter_count(config) == sum(math.prod(s) for s in expected_shapes(config).values())


def test_config_far_bigger_than_its_weights_is_refused_before_the_inventory(tmp_path):
    folder = write_folder(tmp_path / "m", tiny_config())
    (folder / "config.json").write_text(json.dumps({**hf_config(tiny_config()), "num_hidden_layers": 4000}))
    with pytest.raises(CheckpointError, match=r"config implies [\d,]+ parameters .* holds only [\d,]+ weights"):
        load_hf_folder(folder, torch.float32, "cpu")


def gguf_with_head_count(path: Path, head_count: int) -> Path:
    """A minimal llama GGUF whose only flaw is ``llama.attention.head_count``."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(head_count)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(8)])
    writer.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_head_count_zero_is_named(tmp_path):
    from keepkv.models.checkpoint import load_gguf

    with pytest.raises(CheckpointError, match=r"bad\.gguf.*llama\.attention\.head_count"):
        load_gguf(gguf_with_head_count(tmp_path / "bad.gguf", 0), torch.float32, "cpu")


# ---- item 6: NaN weights; item 8: shard paths --------------------------------------------------------------------
def test_nan_weights_are_caught_at_load(tmp_path):
    config = tiny_config()
    state = {name: torch.zeros(shape) for name, shape in expected_shapes(config).items()}
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    folder = write_folder(tmp_path / "nan", config, state)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN"):
        load(folder, compile=False, device="cpu")


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "C:\\weights\\model.safetensors", 7])
def test_shard_index_paths_are_confined_to_the_folder(tmp_path, tiny_folder, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_folder / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    names = expected_shapes(tiny_config())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(CheckpointError, match="shard"):
        load_hf_folder(folder, torch.float32, "cpu")


def test_shards_inside_the_folder_still_load(tmp_path, tiny_folder):
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    (folder / "config.json").write_text((tiny_folder / "config.json").read_text())
    (folder / "weights" / "part.safetensors").write_bytes((tiny_folder / "model.safetensors").read_bytes())
    names = expected_shapes(tiny_config())
    index = {"weight_map": {n: "weights/./part.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, state = load_hf_folder(folder, torch.float32, "cpu")
    assert state.keys() == names.keys()


# ---- items 5 and 6: load() arguments, checked before the model is looked up ---------------------------------------
LOAD_CASES = [
    (dict(kv_budget=0.1, method=3), "method"),
    (dict(kv_budget=0.1, method="full"), "method 'full'"),
    (dict(kv_budget=64, method="FULL"), "method 'full'"),
    (dict(kv_budget=0.1, decode_slack=0), "decode_slack"),
    (dict(kv_budget=0.1, decode_slack=-4), "decode_slack"),
    (dict(kv_budget=0.1, decode_slack=2.5), "decode_slack"),
    (dict(decode_slack=16), "decode_slack"),
    (dict(prefill_chunk_size=1.5), "prefill_chunk_size"),
    (dict(prefill_chunk_size=0), "prefill_chunk_size"),
    (dict(device="meta"), "meta"),
    (dict(device=2.5), "device"),
    (dict(compile="yes"), "compile"),
    (dict(dtype="float64"), "dtype"),
    (dict(revision=3), "revision"),
    (dict(local_files_only="no"), "local_files_only"),
    (dict(kv_budget=0.1, similarity_threshold="x"), "similarity_threshold"),
    (dict(kv_budget=0.1, alpha="high"), "alpha"),
    (dict(kv_budget=0.1, variant=2), "variant"),
    (dict(kv_budget=0.1, method="snapkv", adakv_floor="x"), "adakv_floor"),
    (dict(kv_budget=0.1, method="snapkv", window=2.0), "window"),
    (dict(kv_budget="0.1"), "kv_budget"),
]


@pytest.mark.parametrize("arguments,named", LOAD_CASES)
def test_load_arguments_are_checked_before_the_model_is_looked_up(resolve_must_not_run, arguments, named):
    with pytest.raises(KeepKVError, match=named):
        load(NO_SUCH_MODEL, **arguments)


@pytest.mark.parametrize("name_or_path", [None, 3, b"SmolLM2-135M-Instruct", "  ", "bad\udcff"])
def test_load_name_must_be_text(resolve_must_not_run, name_or_path):
    with pytest.raises(KeepKVError, match="name_or_path"):
        load(name_or_path)


def test_decode_slack_with_a_full_budget_is_accepted(tiny_folder):
    model = load(tiny_folder, kv_budget=1.0, method="keepkv", decode_slack=8, compile=False, device="cpu")
    assert model.method_object.keeps_everything and model.engine.cache_manager.budget is None


def test_method_option_types_accept_ints_for_floats():
    method = make_method("keepkv", similarity_threshold=1, alpha=0.5)
    assert method.similarity_threshold == 1 and method.alpha == 0.5


def test_method_options_are_stored_in_their_fields_type():
    """An int given to a float option is stored as a float and a numpy integer as a Python int, so ``@x=1`` and
    ``@x=1.0`` build one method with one ``options()`` (what result rows and unit keys record)."""

    import numpy as np

    written_as_int = make_method("keepkv", value_norm_power=1, similarity_threshold=np.int64(1),
                                 kernel_size=np.int64(5))
    written_as_float = make_method("keepkv", value_norm_power=1.0, similarity_threshold=1.0, kernel_size=5)
    assert written_as_int.options() == written_as_float.options()
    assert type(written_as_int.value_norm_power) is float and type(written_as_int.similarity_threshold) is float
    assert type(written_as_int.kernel_size) is int
    assert json.dumps(written_as_int.options()) == json.dumps(written_as_float.options())
    composed = make_method("snapkv+keepkv", window=np.int64(16), similarity_threshold=1)
    assert type(composed.selector.window) is int and type(composed.merger.similarity_threshold) is float
    with pytest.raises(KeepKVError, match="kernel_size must be a non-negative integer"):
        make_method("keepkv", kernel_size=5.0)
    with pytest.raises(KeepKVError, match="similarity_threshold must be a finite number"):
        make_method("keepkv", similarity_threshold=True)
    with pytest.raises(KeepKVError, match="alpha must be a finite number"):
        make_method("keepkv", alpha=float("nan"))


# ---- items 4, 5 and 6: generation arguments, checked before the engine starts -------------------------------------
GENERATE_CASES = [
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens="5"), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature="0.5"), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(top_p="0.9"), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed="x"), "seed"),
    (dict(seed=2**70), "seed"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=3), "stop"),
    (dict(stop=["t5", None]), "stop"),
    (dict(chat="yes"), "chat"),
    (dict(padding_side="middle"), "padding_side"),
    (dict(prompt=None), "prompt"),
    (dict(prompt={"text": "t5"}), "prompt"),
    (dict(prompt=b"t5 t6"), "prompt"),
    (dict(prompt=7), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["t5", 6]), r"prompt\[1\]"),
    (dict(prompt="t5 \ud800 t6"), "prompt.*surrogate"),
    (dict(prompt="   "), "prompt is empty"),
]


@pytest.mark.parametrize("arguments,named", GENERATE_CASES)
def test_generate_arguments_are_checked_before_prefill(engine_must_not_run, arguments, named):
    arguments = {"prompt": "t5 t6", **arguments}
    with pytest.raises(KeepKVError, match=named):
        engine_must_not_run.generate(**arguments)


@pytest.mark.parametrize("arguments,named", [
    (dict(prompt=None), "prompt"), (dict(prompt=["t5"]), "prompt"), (dict(prompt="t5", max_new_tokens=1.0),
                                                                       "max_new_tokens"),
    (dict(prompt="t5", seed="1"), "seed"), (dict(prompt="t5\udcff"), "surrogate"),
])
def test_stream_arguments_are_checked_when_called(engine_must_not_run, arguments, named):
    with pytest.raises(KeepKVError, match=named):
        engine_must_not_run.stream(**arguments)  # no next(): the call itself checks


def test_logits_takes_a_tensor(tiny_model):
    with pytest.raises(KeepKVError, match="token_ids"):
        tiny_model.logits([[1, 2, 3]])


@pytest.mark.parametrize("bad", [dict(temperature=float("inf")), dict(top_k=True), dict(seed=1.0)])
def test_sampling_config_checks_types(bad):
    with pytest.raises(KeepKVError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_a_stop_string_is_one_stop_sequence(tiny_model):
    full = tiny_model.generate("t5 t6 t7", max_new_tokens=8)
    words = full.split()
    assert len(set(words)) >= 2, f"the tiny model's continuation is too repetitive for this test: {full!r}"
    word = next(w for w in words[1:] if w not in words[0])  # first found after the first word: a non-empty cut
    expected = full[: full.find(word)]
    assert expected.strip()
    assert tiny_model.generate("t5 t6 t7", max_new_tokens=8, stop=word) == expected
    assert tiny_model.generate("t5 t6 t7", max_new_tokens=8, stop=[word]) == expected
    assert tiny_model.generate("t5 t6 t7", max_new_tokens=8, stop=None) == full


def test_a_stop_string_on_the_real_model(smollm2_eager):
    """``stop="the"`` used to stop at any of the letters t, h, e: ``' Paris.\\n\\nT'``."""
    prompt = "The capital of France is"
    as_list = smollm2_eager.generate(prompt, max_new_tokens=6, stop=["the"])
    assert smollm2_eager.generate(prompt, max_new_tokens=6, stop="the") == as_list
    assert "the" not in as_list and len(as_list) > len(" Paris.\n\nT"), as_list


# ---- item 5: chat templates ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,stage", [
    ("{% for message in messages %}{{ message.content", "compiling"),
    ("{{ messages[0].content + 1 }}", "rendering"),
    ("{{ messages[3].content.upper() }}", "rendering"),
    ("{{ 1 / 0 }}", "rendering"),
])
def test_broken_chat_templates_are_keepkv_errors(tiny_folder, template, stage):
    tokenizer = Tokenizer.from_file(tiny_folder / "tokenizer.json")
    tokenizer.chat_template = template
    with pytest.raises(KeepKVError, match=f"chat template .* failed while {stage}"):
        tokenizer.apply_chat_template([{"role": "user", "content": "t5"}])


# ---- item 9: suggestions -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed,offline", [("smollm2", "SmolLM2-135M-Instruct"),
                                           ("qwen2.5-coder", "Qwen2.5-Coder-0.5B-Instruct"),
                                           ("smollm", "SmolLM2-135M-Instruct")])
def test_suggestions_include_the_offline_models(typed, offline):
    with pytest.raises(KeepKVError, match=f"Did you mean:[^?]*{re.escape(offline)}"):
        get_model(typed)


# ---- items 5 and 9: the command line (rc 2, one message, no traceback) ---------------------------------------------
def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``keepkv.cli.main(argv)`` (argparse's usage errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def latin1_file(tmp_path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    return path


CLI_CASES = [
    (["--bogus"], "--bogus"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--bogus"], "--bogus"),
    (["generate", NO_SUCH_MODEL, "--prompt-file", "/no/such/prompt.txt"], "--prompt-file /no/such/prompt.txt"),
    (["generate", NO_SUCH_MODEL, "--prompt-file", "{latin1}"], "--prompt-file .*not UTF-8"),
    (["generate", NO_SUCH_MODEL, "--prompt-file", "{folder}"], "--prompt-file"),
    (["generate", NO_SUCH_MODEL, "--prompt", "caf\udce9"], "--prompt.*surrogate"),
    (["generate", NO_SUCH_MODEL, "--prompt", " "], "prompt is empty"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--decode-slack", "0"], "--decode-slack"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--decode-slack", "-2"], "--decode-slack"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--decode-slack", "8"], "decode_slack.*kv_budget"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--max-new-tokens", "2.5"], "--max-new-tokens"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--temperature", "inf"], "--temperature"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--top-k", "1.5"], "--top-k"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--seed", "x"], "--seed"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--kv-budget", "0"], "--kv-budget"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--kv-budget", "nan"], "--kv-budget"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--prefill-chunk-size", "1.5"], "--prefill-chunk-size"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--method", "full", "--kv-budget", "0.1"], "method 'full'"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--device", "meta"], "meta"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--kv-budget", "0.1", "--method-option", "alpha=high"], "alpha"),
    (["generate", NO_SUCH_MODEL, "--prompt", "x", "--kv-budget", "0.1", "--method-option",
      "similarity_threshold=x"], "similarity_threshold"),
    (["info", NO_SUCH_MODEL, "--decode-slack", "4"], "decode_slack"),
]


@pytest.mark.parametrize("argv,named", CLI_CASES)
def test_cli_bad_inputs_exit_2_with_one_message(argv, named, latin1_file, tmp_path, capsys, resolve_must_not_run):
    argv = [arg.format(latin1=latin1_file, folder=tmp_path) for arg in argv]
    code, err = run_main(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(named, err), err


def run_script(args: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(KEEPKV_SCRIPT), *args], input=stdin, capture_output=True, timeout=120)


@pytest.mark.skipif(not KEEPKV_SCRIPT.exists(), reason="the keepkv console script is not installed in this venv")
def test_cli_process_names_the_bad_flag_and_bad_bytes():
    bogus = run_script(["--bogus"])
    assert bogus.returncode == 2 and b"--bogus" in bogus.stderr and b"Traceback" not in bogus.stderr
    argv_bytes = run_script(["generate", NO_SUCH_MODEL, "--prompt", b"caf\xe9"])  # not UTF-8 on the command line
    assert argv_bytes.returncode == 2 and b"--prompt" in argv_bytes.stderr, argv_bytes.stderr
    assert b"Traceback" not in argv_bytes.stderr
    stdin = run_script(["generate", NO_SUCH_MODEL], stdin=b"caf\xe9 cr\xe8me")
    assert stdin.returncode == 2 and b"standard input is not UTF-8" in stdin.stderr, stdin.stderr
    assert b"Traceback" not in stdin.stderr


# ---- item 9: torch's own compile-time FutureWarnings --------------------------------------------------------------
def test_a_compiling_generation_hides_torch_compiler_future_warnings(tiny_folder, monkeypatch):
    """Inductor's "torch._prims_common.check is deprecated" reached users of a compiled model; keepkv now filters
    FutureWarnings attributed to torch._dynamo / torch._inductor when a compiling model generates (and only those:
    the user's own FutureWarnings, and torch's other warnings, still show). Nothing is compiled here."""
    import warnings

    model = load(tiny_folder, compile=True, device="cpu")
    monkeypatch.setattr(model.engine, "generate_tokens", lambda *args, **kwargs: iter(()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate("t5 t6", max_new_tokens=2)
        warnings.warn_explicit("check is deprecated", FutureWarning, "lowering.py", 1,
                               module="torch._inductor.lowering")
        warnings.warn_explicit("guard", FutureWarning, "eval_frame.py", 1, module="torch._dynamo.eval_frame")
        warnings.warn_explicit("mine", FutureWarning, "user.py", 1, module="user_code")
        warnings.warn_explicit("deprecated", DeprecationWarning, "lowering.py", 2, module="torch._inductor.lowering")
    assert sorted(str(w.message) for w in caught) == ["deprecated", "mine"]
