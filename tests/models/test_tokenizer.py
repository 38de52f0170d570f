"""Tokenizers rebuilt from GGUF metadata (SmolLM2: ``smollm``; Qwen2.5-Coder: ``qwen2``) and read from tokenizer.json.

Claims: decode(encode(text)) == text (NFC text for Qwen2); Qwen2 ids equal transformers' GGUF tokenizer; SmolLM2 ids
equal it except for the documented digit-isolation difference (see ``keepkv.models.tokenizer``); chat templates
render as transformers renders them. The real GGUF files are located as in ``tests/models/test_checkpoint.py``.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import processors

from keepkv.errors import KeepKVError
from keepkv.models.checkpoint import GGUFTokenizerData, read_gguf_tokenizer_data
from keepkv.models.tokenizer import Tokenizer
from tests.models.test_checkpoint import qwen_gguf_path, smollm2_gguf_path

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "naïve café, straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية 🤖🎉👩‍💻",
    "The year 2024 had 366 days; pi ~ 3.14159, 1,000,000 and 007.",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\n\tif x != 0: pass\r\n",
    "   leading, trailing and    inner whitespace runs   \n\n\n  ",
    "I'm sure they've said WE'LL go, it's 'quoted'.",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    " ",
]
# Varied strings on which keepkv and transformers' GGUF tokenizers must agree, for both files.
AGREEING_TEXTS = [
    "Hello, world!",
    "naïve café — 日本語のテキスト 🤖",
    "def f(x):\n    return x**2\n",
    "I'm can't WE'LL they've",
    "12345 + 67890 = 80235",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "tabs\tand\nnewlines\n\nhere",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf_tokenizer_data(smollm2_gguf_path()))


@pytest.fixture(scope="module")
def qwen_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf_tokenizer_data(qwen_gguf_path()))


def transformers_gguf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2_reference():
    return transformers_gguf_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def qwen_reference():
    return transformers_gguf_tokenizer(qwen_gguf_path())


# ---- SmolLM2 ----------------------------------------------------------------------------------------------------
def test_smollm2_attributes(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_token_ids == (2, 0)  # <|im_end|>, then <|endoftext|> (llama.cpp's end-of-generation set)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.add_bos) == (1, 2, False)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_smollm2_round_trip(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text


def representable_by(tokenizer: Tokenizer, character: str) -> bool:
    """Whether every UTF-8 byte of ``character`` has a byte-level token in the vocabulary."""
    from tokenizers.pre_tokenizers import ByteLevel

    try:
        spelled = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(character)[0][0]
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 bytes at all
        return False
    return all(tokenizer.backend.token_to_id(symbol) is not None for symbol in spelled)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_smollm2_round_trip_any_text(smollm2_tokenizer, data):
    """Any text made of characters the vocabulary can spell round-trips exactly."""
    characters = st.characters(codec="utf-8").filter(lambda c: representable_by(smollm2_tokenizer, c))
    text = data.draw(st.text(alphabet=characters, max_size=60))
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text), skip_special_tokens=False) == text


def test_smollm2_vocabulary_gaps_drop_bytes(smollm2_tokenizer, smollm2_reference):
    """SmolLM2's vocabulary has no token for the bytes 0x04 0x06 0x13 0x14 0x16 0x1d, 0xc0 0xc1, 0xf1 0xf2 and
    0xf5-0xff (so for a few control characters and for planes 4-11). Such bytes are dropped, as llama.cpp and
    transformers drop them."""
    assert not representable_by(smollm2_tokenizer, "\x04") and not representable_by(smollm2_tokenizer, "\U00040000")
    assert representable_by(smollm2_tokenizer, "🤖")
    for text in ("a\x04b", "x\U00040000y"):
        assert smollm2_tokenizer.encode(text) == smollm2_reference.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode("a\x04b")) == "ab"


def test_smollm2_splits_digits_like_its_own_tokenizer(smollm2_tokenizer):
    """SmolLM's pre-tokenizer isolates every digit before the GPT-2 regex (where transformers' GGUF port differs)."""
    def pieces(text: str) -> list[str]:
        return [smollm2_tokenizer.token_text(i) for i in smollm2_tokenizer.encode(text)]

    assert pieces("a   8") == ["a", "ĠĠĠ", "8"]
    assert pieces("x\r\n1") == ["x", "čĊ", "1"]
    assert pieces("2024") == ["2", "0", "2", "4"]


def test_smollm2_ids_match_transformers(smollm2_tokenizer, smollm2_reference):
    for text in AGREEING_TEXTS:
        assert smollm2_tokenizer.encode(text) == smollm2_reference.encode(text, add_special_tokens=False), text


def test_smollm2_chat_template(smollm2_tokenizer, smollm2_reference):
    rendered = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2_tokenizer.encode(rendered)[:3] == [1, 9690, 198]  # <|im_start|> is one special token
    for add_generation_prompt in (True, False):
        ours = smollm2_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        theirs = smollm2_reference.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours == theirs


# ---- Qwen2.5-Coder ----------------------------------------------------------------------------------------------
def test_qwen_attributes(qwen_tokenizer):
    tokenizer = qwen_tokenizer
    assert tokenizer.vocab_size == 151936
    assert tokenizer.eos_token_ids == (151645, 151643)  # <|im_end|>, <|endoftext|>
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.add_bos) == (151643, 151643, False)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_qwen_round_trip(qwen_tokenizer, text):
    assert qwen_tokenizer.decode(qwen_tokenizer.encode(text), skip_special_tokens=False) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_qwen_round_trip_any_text_up_to_nfc(qwen_tokenizer, text):
    decoded = qwen_tokenizer.decode(qwen_tokenizer.encode(text), skip_special_tokens=False)
    assert decoded == unicodedata.normalize("NFC", text)


def test_qwen_ids_match_transformers(qwen_tokenizer, qwen_reference):
    for text in AGREEING_TEXTS + ROUND_TRIP_TEXTS + ["x=12,345.67 $99\r\n<tool_call>{}</tool_call>"]:
        assert qwen_tokenizer.encode(text) == qwen_reference.encode(text, add_special_tokens=False), text


def test_qwen_special_and_user_defined_tokens(qwen_tokenizer):
    ids = qwen_tokenizer.encode("<|im_start|>hi<|im_end|><tool_call>x</tool_call>")
    assert ids[0] == 151644 and ids[2] == 151645 and 151657 in ids and 151658 in ids
    assert qwen_tokenizer.decode(ids) == "hi<tool_call>x</tool_call>"  # control tokens dropped, user-defined kept


def test_qwen_chat_template_matches_transformers(qwen_tokenizer, qwen_reference):
    for messages in (MESSAGES[1:], MESSAGES):
        ours = qwen_tokenizer.apply_chat_template(messages)
        assert ours == qwen_reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


# ---- behaviour independent of the real files ---------------------------------------------------------------------
def tiny_gguf_data(**changes) -> GGUFTokenizerData:
    """A byte-level BPE vocabulary: every byte symbol, the merge ``h e``, and two control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = (*alphabet, "he", "<s>", "</s>")
    fields = {
        "source": "tiny.gguf", "model": "gpt2", "pre": "gpt-2", "tokens": tokens,
        "token_types": (1,) * (len(tokens) - 2) + (3, 3), "merges": ("h e",), "scores": (),
        "bos_token_id": len(tokens) - 2, "eos_token_ids": (len(tokens) - 1,), "pad_token_id": None,
        "unk_token_id": None, "add_bos_token": True, "add_space_prefix": False, "chat_template": None,
    }
    return GGUFTokenizerData(**{**fields, **changes})


def test_add_bos_follows_the_file_and_never_doubles():
    tokenizer = Tokenizer.from_gguf(tiny_gguf_data())
    bos, he = tokenizer.bos_token_id, tokenizer.backend.token_to_id("he")
    assert tokenizer.encode("he") == [bos, he]
    assert tokenizer.encode("<s>he") == [bos, he]
    assert tokenizer.encode("he", add_bos=False) == [he]
    assert tokenizer.decode([bos, he]) == "he" and tokenizer.decode([bos, he], skip_special_tokens=False) == "<s>he"
    without_bos = Tokenizer.from_gguf(tiny_gguf_data(bos_token_id=None))
    assert without_bos.encode("he") == [he]
    with pytest.raises(KeepKVError, match="no BOS token"):
        without_bos.encode("he", add_bos=True)


def test_add_space_prefix():
    tokenizer = Tokenizer.from_gguf(tiny_gguf_data(add_space_prefix=True, add_bos_token=False))
    assert [tokenizer.token_text(i) for i in tokenizer.encode("he")] == ["Ġ", "he"]


def test_unsupported_gguf_tokenizers_are_refused():
    with pytest.raises(KeepKVError, match="tokenizer model 'llama' is not supported"):
        Tokenizer.from_gguf(tiny_gguf_data(model="llama"))
    with pytest.raises(KeepKVError, match="unknown GGUF pre-tokenizer 'qwen3'.*Did you mean: qwen2"):
        Tokenizer.from_gguf(tiny_gguf_data(pre="qwen3"))


def test_missing_chat_template_is_a_clear_error():
    tokenizer = Tokenizer.from_gguf(tiny_gguf_data())
    with pytest.raises(KeepKVError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    templated = Tokenizer.from_gguf(tiny_gguf_data(chat_template="{{ messages[0]['content'] }}"))
    with pytest.raises(KeepKVError, match="messages must be a list of dicts"):
        templated.apply_chat_template([("user", "hi")])


def test_chat_template_is_sandboxed():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tokenizer = Tokenizer.from_gguf(tiny_gguf_data(chat_template=escape))
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_file_matches_from_gguf(tmp_path, smollm2_tokenizer):
    """A tokenizer.json saved from the GGUF-built tokenizer, read back with its tokenizer_config.json."""
    smollm2_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_end|>",
        "chat_template": smollm2_tokenizer.chat_template,
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.pad_token_id, loaded.add_bos) == (1, (2, 0), 2, False)
    assert loaded.vocab_size == 49152
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == smollm2_tokenizer.encode(text)
    assert loaded.apply_chat_template(MESSAGES) == smollm2_tokenizer.apply_chat_template(MESSAGES)


def test_from_file_takes_bos_from_the_post_processor(tmp_path):
    tokenizer = Tokenizer.from_gguf(tiny_gguf_data(add_bos_token=False))
    backend = tokenizer.backend
    bos, he = backend.token_to_id("<s>"), backend.token_to_id("he")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.bos_token_id == bos and loaded.add_bos
    assert loaded.encode("he") == [bos, he]  # added once, by keepkv, not twice
    assert loaded.apply_chat_template([{"role": "user", "content": "he"}]) == "he"


def test_from_file_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(KeepKVError, match="not a readable tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    Tokenizer.from_gguf(tiny_gguf_data()).backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(KeepKVError, match="should hold a JSON object"):
        Tokenizer.from_file(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
