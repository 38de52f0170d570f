"""``keepkv serve``: the official ``openai`` client against a live uvicorn server on a free local port.

One server (real SmolLM2, float32, eager) runs in a thread for the whole module. References come from
``model.generate`` on the same model, called only while the server is idle (the worker owns the model otherwise).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from keepkv.serve.app import create_app  # noqa: E402
from keepkv.serve.scheduler import RowDecoder, padded_rows  # noqa: E402

pytestmark = pytest.mark.real_model
MODEL_ID = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "One, two, three,", "def fibonacci(n):", "Water boils at"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_idle(app, timeout: float = 20.0) -> None:
    """Until no job holds a slot and no batch runs (a cancelled row is dropped at the worker's next step)."""
    scheduler = app.state.scheduler
    deadline = time.monotonic() + timeout
    while (scheduler.slots_in_use or scheduler.running_rows) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.slots_in_use == 0 and scheduler.running_rows == 0


@pytest.fixture(scope="module")
def server(smollm2_eager):
    model = smollm2_eager
    app = create_app(model, max_batch=4, batch_window=0.05, model_id=MODEL_ID)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(model=model, app=app, url=url, client=client)
    uv.should_exit = True
    thread.join(30)


def reference(server, prompt: str, max_tokens: int, chat: bool = False) -> str:
    _wait_idle(server.app)
    return server.model.generate(prompt, max_new_tokens=max_tokens, chat=chat)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL_ID]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["slots_in_use"] == 0


def test_completion_equals_generate(server):
    expected = reference(server, PROMPTS[0], 8)
    reference_tokens = server.model.last_stats.new_tokens
    answer = server.client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert answer.choices[0].text == expected and expected
    assert answer.usage.prompt_tokens == len(server.model.tokenizer.encode(PROMPTS[0]))
    # the server counts the tokens it generated: those of the same greedy generation (an end-of-sequence token
    # is generated but not part of the text), and "length" exactly when it used all 8
    assert answer.usage.completion_tokens in (reference_tokens, reference_tokens - 1)
    assert (answer.choices[0].finish_reason == "length") == (answer.usage.completion_tokens == 8)


def test_chat_and_streaming_equal_non_streamed(server):
    question = "What is the capital of France?"
    expected = reference(server, question, 10, chat=True)
    messages = [{"role": "user", "content": question}]
    answer = server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    chunks = list(server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    pieces = list(server.client.completions.create(model=MODEL_ID, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                                   stream=True))
    plain = server.client.completions.create(model=MODEL_ID, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert len(pieces) > 2 and "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_concurrent_clients_batched_and_correct(server):
    expected = [reference(server, p, 6) for p in PROMPTS]
    batches_before = server.app.state.scheduler.batches
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = server.client.completions.create(model=MODEL_ID, prompt=PROMPTS[i], max_tokens=6, temperature=0)
        answers[i] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [answers.get(i) for i in range(len(PROMPTS))] == expected
    assert server.app.state.scheduler.batches - batches_before < len(PROMPTS)  # some requests shared a batch
    _wait_idle(server.app)


def test_kv_budget_override(server):
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    answer = server.client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0,
                                              extra_body={"kv_budget": 0.25, "method": "snapkv"})
    assert answer.choices[0].text
    variant = server.app.state.variants.get(("snapkv", 0.25))
    assert variant.method == "snapkv" and variant.network is server.model.network
    assert variant.engine.cache_manager.budget == -(-answer.usage.prompt_tokens // 4)


def test_bad_requests_get_openai_errors(server):
    client = server.client
    long_prompt = "hello " * (server.model.config.max_position_embeddings + 10)
    with pytest.raises(openai.BadRequestError, match="maximum context length") as err:
        client.completions.create(model=MODEL_ID, prompt=long_prompt, max_tokens=4)
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match="temperature") as err:
        client.completions.create(model=MODEL_ID, prompt="hi", temperature=7)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer >= 1"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="kv_budget"):
        client.completions.create(model=MODEL_ID, prompt="hi", extra_body={"kv_budget": 1.5})
    with pytest.raises(openai.BadRequestError, match="n=3"):
        client.completions.create(model=MODEL_ID, prompt="hi", n=3)
    with pytest.raises(openai.BadRequestError, match="nosuchmethod"):
        client.completions.create(model=MODEL_ID, prompt="hi", extra_body={"method": "nosuchmethod", "kv_budget": 0.5})
    with pytest.raises(openai.NotFoundError, match="does not exist") as err:
        client.completions.create(model="gpt-4", prompt="hi")
    assert err.value.code == "model_not_found"
    raw = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert server.app.state.scheduler.slots_in_use == 0


def test_disconnect_mid_stream_frees_the_slot(server):
    scheduler = server.app.state.scheduler
    cancelled_before, started = scheduler.cancelled_rows, time.monotonic()
    body = {"model": MODEL_ID, "prompt": PROMPTS[2], "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert received and scheduler.slots_in_use == 1
    # the connection is closed: the worker drops the row at its next step and ends the batch
    _wait_idle(server.app)
    assert scheduler.cancelled_rows == cancelled_before + 1  # dropped mid-generation, not run to 1000 tokens
    assert time.monotonic() - started < 10
    answer = server.client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert answer.choices[0].text and scheduler.slots_in_use == 0


def test_many_requests_keep_rss_bounded(server):
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("RSS is read from /proc/self/statm (Linux)")
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(statm.read_text().split()[1]) * page  # noqa: E731
    ask = lambda: server.client.completions.create(model=MODEL_ID, prompt=PROMPTS[3], max_tokens=2,  # noqa: E731
                                                   temperature=0)
    for _ in range(3):
        ask()
    before = rss()
    for _ in range(20):
        ask()
    growth = rss() - before
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 20 requests"
    assert server.app.state.scheduler.slots_in_use == 0


def test_row_decoder_holds_back_stop_prefixes_and_utf8():
    class Chars:  # token id = a character code; 0 is eos
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    decoder = RowDecoder(Chars(), {0}, ("END",), 100)
    out = [decoder.push(ord(c)) for c in "abEN"]
    assert "".join(d for d, _ in out) == "ab" and all(f is None for _, f in out)  # "EN" may start "END"
    assert decoder.push(ord("D")) == ("", "stop")
    decoder = RowDecoder(Chars(), {0}, ("END",), 3)
    assert [decoder.push(ord(c)) for c in "xyE"] == [("x", None), ("y", None), ("E", "length")]
    assert [padded_rows(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8] and padded_rows(3, 3) == 3
