"""``keepkv serve --tp 2``: two gloo ranks on CPU behind the official ``openai`` client, against one process.

The model is test_tp.py's tiny random-weight Qwen2 (8 query / 4 KV heads, so 2 KV heads per rank; SmolLM2's 3 KV
heads do not divide by 2), eager, at a 10% KeepKV budget so that the ranks compress their own heads during prefill
and decoding. One ``torchrun`` server answers the completion, batch, sampling, streaming and error cases and is then
stopped with SIGTERM to the launcher (a request the engine refuses fails alike on every rank, and serving goes
on). Two more launches start the ranks the way torchrun does (``RANK``,
``WORLD_SIZE``, ... in the environment) so that each rank's exit status can be read: SIGINT to every rank (a
terminal's Ctrl-C) ends both with status 0; a follower killed with SIGKILL ends rank 0, the server, with status 2
and a message naming the lost peer, within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from keepkv.models import load  # noqa: E402
from tests.distributed.test_tp import _free_port, prompt_text, write_tiny_qwen  # noqa: E402

WORLD = 2
MODEL_ID = "tiny"
CACHE = ["--kv-budget", "0.1", "--method", "keepkv", "--decode-slack", "8"]
COMMON = ["serve", "--device", "cpu", "--prefill-chunk-size", "128", "--served-model-name", MODEL_ID,
          "--batch-window-ms", "100",  # a two-prompt request stays one batch even on a loaded machine
          "--tp", str(WORLD), *CACHE]
START_TIMEOUT = 120  # seconds for the ranks to import, load and listen (a busy 2-core machine)
STOP_TIMEOUT = 20  # seconds for every rank to exit once asked (torchrun's own SIGKILL fallback comes at 30)


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KEEPKV_TP_TIMEOUT": "20", **extra}


def _wait_healthy(url: str, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        dead = [p for p in processes if p.poll() is not None]
        assert not dead, f"a rank exited before serving: {dead[0].communicate()[1][-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the --tp {WORLD} server did not answer /health within {START_TIMEOUT}s")


def _stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _launch_ranks(folder: Path, port: int) -> list[subprocess.Popen]:
    """The two ranks started as torchrun starts them (each one's exit status readable)."""
    master = str(_free_port())
    return [subprocess.Popen(
        [sys.executable, "-m", "keepkv", *COMMON[:1], str(folder), *COMMON[1:], "--port", str(port), "--no-compile"],
        env=_environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=master),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(WORLD)]


def _exit_status(process: subprocess.Popen) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return -999, stderr, STOP_TIMEOUT
    return process.returncode, stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return write_tiny_qwen(tmp_path_factory.mktemp("serve-tp-tiny"))


@pytest.fixture(scope="module")
def one_process(tiny_qwen):
    """The same model and cache setting in this process (the reference)."""
    return load(tiny_qwen, kv_budget=0.1, method="keepkv", decode_slack=8, device="cpu", compile=False,
                prefill_chunk_size=128)


def _torchrun(folder: Path, port: int, *extra: str) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m keepkv serve FOLDER ... --tp 2 --port PORT``."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port",
         str(_free_port()), "-m", "keepkv", *COMMON[:1], str(folder), *COMMON[1:], "--port", str(port), *extra],
        env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_tp_server_answers_like_one_process_and_stops_on_sigterm(tiny_qwen, one_process):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    launcher = _torchrun(tiny_qwen, port, "--no-compile")
    try:
        _wait_healthy(url, [launcher])
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompt, short = prompt_text(), " ".join(prompt_text().split()[:370])  # 10% >= keepkv's 36 protected
        # greedy, token for token (the ranks compress their own KV heads at 10% during prefill and decoding)
        answer = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
        expected = one_process.generate(prompt, max_new_tokens=12)
        assert answer.choices[0].text == expected and len(expected.split()) > 4
        assert answer.usage.prompt_tokens == len(one_process.tokenizer.encode(prompt))
        # two prompts of one request: one left-padded batch on every rank, as one process batches them
        batch = client.completions.create(model=MODEL_ID, prompt=[prompt, short], max_tokens=8, temperature=0)
        assert [c.text for c in batch.choices] == one_process.generate([prompt, short], max_new_tokens=8)
        # sampling: rank 0's seed drives every rank (given, the one-process tokens; absent, rank 0 draws one)
        seeded = client.completions.create(model=MODEL_ID, prompt=short, max_tokens=8, temperature=0.9, seed=5)
        assert seeded.choices[0].text == one_process.generate(short, max_new_tokens=8, temperature=0.9, seed=5)
        assert client.completions.create(model=MODEL_ID, prompt=short, max_tokens=6, temperature=0.9).choices
        # streaming: the deltas add up to the non-streamed text
        pieces = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True))
        assert len(pieces) > 2 and "".join(p.choices[0].text for p in pieces) == expected
        # a bad request is an OpenAI error and runs nothing on any rank
        with pytest.raises(openai.BadRequestError, match="maximum context length") as err:
            client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4000)
        assert err.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.completions.create(model=MODEL_ID, prompt=short, temperature=7)
        # work the engine refuses (10% of 150 tokens is below keepkv's 36 protected entries) fails alike on every
        # rank before any collective: that request gets the error, the server goes on
        with pytest.raises(openai.InternalServerError, match="protected entries"):
            client.completions.create(model=MODEL_ID, prompt=" ".join(prompt.split()[:150]), max_tokens=4)
        again = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
        assert again.choices[0].text == expected
        health = httpx.get(f"{url}/health").json()
        assert health["slots_in_use"] == 0 and health["batches"] == 7, health
        launcher.send_signal(signal.SIGTERM)  # torchrun forwards SIGTERM to every rank
        status, stderr, seconds = _exit_status(launcher)
        assert status != -999, f"torchrun still running {STOP_TIMEOUT}s after SIGTERM: {stderr[-3000:]}"
        assert "lost its peers" not in stderr and "keepkv: error" not in stderr, stderr[-3000:]
    finally:
        _stop_all([launcher])


def test_tp_server_ranks_exit_0_on_sigint(tiny_qwen):
    port = _free_port()
    ranks = _launch_ranks(tiny_qwen, port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", ranks)
        for rank in ranks:  # a terminal's Ctrl-C reaches every process of the group
            rank.send_signal(signal.SIGINT)
        for index, rank in enumerate(ranks):
            status, stderr, _ = _exit_status(rank)
            assert status == 0, f"rank {index} exited with {status}: {stderr[-3000:]}"
    finally:
        _stop_all(ranks)


def test_tp_server_stops_with_a_clear_error_when_a_rank_dies(tiny_qwen):
    port = _free_port()
    ranks = _launch_ranks(tiny_qwen, port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", ranks)
        ranks[1].kill()  # the follower dies while the server is idle: rank 0 notices at its next heartbeat
        status, stderr, seconds = _exit_status(ranks[0])
        assert status == 2, f"rank 0 exited with {status} after {seconds:.1f}s: {stderr[-3000:]}"
        assert "keepkv: error: tensor parallelism: rank 0 lost its peers" in stderr, stderr[-3000:]
        assert seconds < 15
    finally:
        _stop_all(ranks)


@pytest.mark.slow
@pytest.mark.compile
def test_tp_server_compiled_matches_one_process(tiny_qwen):
    """The compiled engine on both ranks (rank 0 pads batches to a power of two; every rank compiles its decode
    step with the all-reduces traced in) against one compiled process."""
    single = load(tiny_qwen, kv_budget=0.1, method="keepkv", decode_slack=8, device="cpu", compile=True,
                  prefill_chunk_size=128)
    prompts = [prompt_text(), " ".join(prompt_text().split()[:370]), " ".join(prompt_text().split()[:390])]
    expected = single.generate(prompts[0], max_new_tokens=12)
    batched = single.generate(prompts, max_new_tokens=8)  # 3 rows; the server pads them to 4 (one process: not)
    port = _free_port()
    launcher = _torchrun(tiny_qwen, port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", [launcher])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        answer = client.completions.create(model=MODEL_ID, prompt=prompts[0], max_tokens=12, temperature=0)
        assert answer.choices[0].text == expected
        batch = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=8, temperature=0)
        assert [c.text for c in batch.choices] == batched
        launcher.send_signal(signal.SIGTERM)
        status, stderr, _ = _exit_status(launcher)
        assert status != -999 and "keepkv: error" not in stderr, stderr[-3000:]
    finally:
        _stop_all([launcher])
