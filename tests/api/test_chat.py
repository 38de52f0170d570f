"""Chat: ``generate(messages=...)`` / ``stream(messages=...)``, multi-turn :class:`ChatSession` and ``keepkv chat``.

On the real SmolLM2-135M-Instruct (float32, greedy, short turns). The session must append each turn to the cache it
kept (never re-prefill earlier turns); with the full cache its second reply must equal one ``generate`` over the
whole chat-templated transcript.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keepkv.chat import ChatSession
from keepkv.errors import KeepKVError

SYSTEM = "You are a concise assistant."
QUESTION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
TURNS = ("What is the capital of France?", "And the capital of Italy?")
DOCUMENT = (Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt").read_text(encoding="utf-8")[:1200]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(smollm2_eager):
    return smollm2_eager


# ---- messages ------------------------------------------------------------------------------------------------
def test_messages_use_the_chat_template(model):
    rendered = model.tokenizer.apply_chat_template(QUESTION)
    assert "<|im_start|>system" in rendered and rendered.rstrip().endswith("<|im_start|>assistant")
    expected = model.generate(rendered, max_new_tokens=8)
    assert model.generate(messages=QUESTION, max_new_tokens=8) == expected
    assert "".join(model.stream(messages=QUESTION, max_new_tokens=8)) == expected
    user_only = QUESTION[1:]
    assert model.generate(messages=user_only, max_new_tokens=8) == model.generate(
        QUESTION[1]["content"], chat=True, max_new_tokens=8)
    batch = model.generate(messages=[QUESTION, user_only], max_new_tokens=8)
    assert batch == [expected, model.generate(messages=user_only, max_new_tokens=8)]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list of messages"),
    ("hello", "non-empty list of messages"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\]\['role'\] is 'robot'.*allowed roles: system, user, assistant"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str"),
    ([{"role": "user"}], r"messages\[0\] lacks \['content'\]"),
    ([{"role": "user", "content": "hi", "name": "x"}], r"unknown key\(s\) \['name'\]"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "may only come first"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "role 'assistant'.*user's"),
    ([{"role": "user", "content": "  "}], "empty"),
    ([[{"role": "user", "content": "hi"}], [{"role": "user"}]], r"messages\[1\]\[0\] lacks"),
])
def test_bad_messages_say_what_is_allowed(model, messages, match):
    with pytest.raises(KeepKVError, match=match):
        model.generate(messages=messages, max_new_tokens=2)


def test_prompt_and_messages_exclude_each_other(model):
    with pytest.raises(KeepKVError, match="either a prompt or messages"):
        model.generate("hi", messages=QUESTION)
    with pytest.raises(KeepKVError, match="either a prompt or messages"):
        model.stream("hi", messages=QUESTION)


# ---- sessions ------------------------------------------------------------------------------------------------
def count_fed_tokens(session: ChatSession) -> list[int]:
    """Record the real tokens of every chunk forward the session's engine runs (prefill / extend, not decode)."""
    fed: list[int] = []
    forward = session.engine._forward_chunk

    def counting(input_ids, positions, valid):
        fed.append(int(valid.sum()))
        return forward(input_ids, positions, valid)

    session.engine._forward_chunk = counting
    return fed


def test_full_cache_session_equals_one_generate_over_the_transcript(model):
    session = ChatSession(model, kv_budget=1.0, system=SYSTEM, max_new_tokens=12)
    fed = count_fed_tokens(session)
    first = session.send(TURNS[0])
    assert first.strip() and session.last_turn.start_position == 0
    after_first = session.last_turn.total_tokens
    second = session.send(TURNS[1])
    transcript = session.messages
    assert [m["role"] for m in transcript] == ["system", "user", "assistant", "user", "assistant"]
    assert transcript[2]["content"] == first and transcript[4]["content"] == second
    full_ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(transcript[:4]))
    turn = session.last_turn
    # continuation: only the new text ran through the model, at the positions after the first turn
    assert turn.token_prefix_reused and turn.start_position == after_first
    assert turn.fed_tokens == len(full_ids) - after_first and fed == [session.turns[0].fed_tokens, turn.fed_tokens]
    assert session.token_ids[: len(full_ids)] == full_ids
    assert second == model.generate(messages=transcript[:4], max_new_tokens=12)


def test_compressed_session_appends_each_turn_to_the_compressed_cache(model):
    session = ChatSession(model, kv_budget=0.2, method="keepkv", max_new_tokens=8, decode_slack=4)
    fed = count_fed_tokens(session)
    session.send("Summarise this text in one sentence.\n\n" + DOCUMENT)
    first = session.last_turn
    assert first.compressions >= 1 and first.budget < first.fed_tokens
    entries_after_first = session.entries_per_head()
    assert int(entries_after_first.max()) <= first.budget + 4
    session.send("Name one term it defines.")
    second = session.last_turn
    assert second.start_position == first.total_tokens and fed[-1] == second.fed_tokens < 40
    assert second.total_tokens == first.total_tokens + second.fed_tokens + second.reply_tokens
    protected = session.engine.cache_manager.method.protected_entries
    assert second.budget == max(protected, -(-2 * (first.total_tokens + second.fed_tokens) // 10))
    positions = session.cache_positions()
    live = positions[positions >= 0]
    assert int(live.max()) == second.total_tokens - 1
    assert int((live < first.start_position + first.fed_tokens).sum()) > 0  # the first turn survives, compressed
    assert int(session.entries_per_head().max()) <= second.budget + 4


def test_short_turns_never_fall_below_the_protected_entries(model):
    session = ChatSession(model, kv_budget=0.1, method="snapkv", max_new_tokens=4)
    session.send("Hi!")
    session.send("How are you?")
    protected = session.engine.cache_manager.method.protected_entries
    assert session.last_turn.budget == protected and session.last_turn.start_position == session.turns[0].total_tokens


def test_session_checks(model):
    with pytest.raises(KeepKVError, match="max_new_tokens"):
        ChatSession(model, max_new_tokens=0)
    session = ChatSession(model, kv_budget=1.0, max_new_tokens=2)
    with pytest.raises(KeepKVError, match="empty"):
        session.send("   ")
    with pytest.raises(KeepKVError, match=r"unknown option\(s\) \['stop'\]"):
        session.send("hi", stop="x")
    with pytest.raises(KeepKVError, match="exceed the model's context of 8192"):
        session.send("hi", max_new_tokens=9000)
    assert session.messages == [] and session.position == 0  # refused turns leave no trace


@pytest.mark.slow  # about 40 s with a warm inductor cache (two turns' graphs), 2 min cold
@pytest.mark.compile
def test_session_on_the_compiled_default_path(smollm2_gguf):
    from keepkv.models import load

    compiled = load(smollm2_gguf, kv_budget=64, device="cpu")  # KeepKV, torch.compile, flex attention
    session = ChatSession(compiled, max_new_tokens=6)
    first_text = "Summarise: " + DOCUMENT[:800]
    first = session.send(first_text)
    # the first turn is exactly a generate() of the same messages with the same settings
    assert first == compiled.generate(messages=[{"role": "user", "content": first_text}], max_new_tokens=6)
    assert session.last_turn.compressions >= 1
    second = session.send("Thanks. One more word?")
    turn = session.last_turn
    assert second.strip() and turn.start_position == session.turns[0].total_tokens and turn.fed_tokens < 30
    assert session.turns[0].total_tokens == session.turns[0].fed_tokens + session.turns[0].reply_tokens
    assert turn.budget == 64 and turn.compressions >= 1
    assert int(session.entries_per_head().max()) <= 64 + compiled.engine.cache_manager.decode_slack


# ---- command line --------------------------------------------------------------------------------------------
def test_chat_command_reads_turns_from_piped_stdin(smollm2_gguf, model):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-m", "keepkv.cli", "chat", str(smollm2_gguf), "--kv-budget", "0.2", "--method", "tova",
         "--no-compile", "--max-new-tokens", "10", "--system", SYSTEM],
        input="\n".join(TURNS) + "\n", capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    session = ChatSession(model, kv_budget=0.2, method="tova", system=SYSTEM, max_new_tokens=10)
    replies = [session.send(text) for text in TURNS]
    assert completed.stdout == "".join(reply + "\n" for reply in replies)
    turns = re.findall(r"turn (\d): (\d+) new tokens fed at position (\d+)", completed.stderr)
    assert [(int(a), int(b), int(c)) for a, b, c in turns] == [
        (t.turn, t.fed_tokens, t.start_position) for t in session.turns]
    assert turns[1][2] != "0"  # the second turn continued the cache
    assert torch.is_tensor(session.entries_per_head())
