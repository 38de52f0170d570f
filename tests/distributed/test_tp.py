"""Tensor parallelism (``keepkv.distributed``): 2 gloo ranks on CPU against one process, token for token.

One spawn of 2 ranks runs every case (the process start and imports dominate): a tiny random-weight Qwen2
(attention biases, 8 query / 4 KV heads: 2 KV heads per rank) with the full cache and at a 10% budget with keepkv,
snapkv, tova and the methods that reduce across KV heads (Ada-KV's global head budgets, D2O's layer variance,
CaM's per-head random stream). Each rank's caches must hold exactly the single process's entries for its heads
(positions; votes to float32 rounding) and every rank must generate the single process's greedy tokens. The
same spawn checks that SmolLM2 (3 KV heads) refuses ``tp=2``. A second spawn kills a rank and checks that the
survivor fails with a clear error instead of hanging. Eager (``compile=False``); the compiled case is ``slow``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from keepkv.errors import KeepKVError
from keepkv.models import load
from tests.conftest import tiny_config, tiny_network, write_tiny_tokenizer

WORLD = 2
PROMPT_TOKENS = 400
NEW_TOKENS = 24
EOS = 127
BUDGET = 0.1
CASES = {  # name -> (method, kv_budget, method options)
    "full": (None, None, {}),
    "keepkv": ("keepkv", BUDGET, {}),
    "keepkv@blend": ("keepkv", BUDGET, {"selection": "blend"}),  # heads matched by position across the ranks
    "keepkv@floor": ("keepkv", BUDGET, {"selection": "floor"}),  # the same match, then each head's budget split
    "snapkv": ("snapkv", BUDGET, {}),
    "tova": ("tova", BUDGET, {}),
    "adakv-snapkv": ("adakv-snapkv", BUDGET, {}),
    "d2o": ("d2o", BUDGET, {}),
    "cam": ("cam", BUDGET, {}),
}
SPAWN_TIMEOUT = 240  # seconds a spawn may take before the test fails (it never hangs the suite)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_tiny_qwen(folder: Path) -> Path:
    """A Hugging Face folder: a 2-layer qwen2 (q/k/v biases) with 8 query and 4 KV heads, random weights."""
    config = tiny_config("qwen2", num_heads=8, num_kv_heads=4, head_dim=16, attention_bias=True,
                         eos_token_ids=(EOS,))
    state = {name: tensor.contiguous() for name, tensor in tiny_network(config, seed=1).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": False, "eos_token_id": EOS, "pad_token_id": 0,
    }))
    write_tiny_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{EOS}", "pad_token": "t0"}))
    return folder


def prompt_text() -> str:
    generator = torch.Generator().manual_seed(7)
    return " ".join(f"t{int(i)}" for i in torch.randint(3, EOS, (PROMPT_TOKENS,), generator=generator))


def run_case(folder: Path, case: str, tp: int, compile: bool = False) -> dict:
    """Greedy text and every layer's kept positions and votes ``[batch, kv_heads, capacity]`` for one case."""
    method, budget, options = CASES[case]
    extra = {"decode_slack": 8} if budget is not None else {}
    model = load(folder, kv_budget=budget, method=method, device="cpu", compile=compile, prefill_chunk_size=128,
                 tp=tp, **extra, **options)
    text = model.generate(prompt_text(), max_new_tokens=NEW_TOKENS)
    caches = model.engine.caches
    return {"text": text, "positions": [c.positions.clone() for c in caches],
            "log_votes": [c.log_votes.clone() for c in caches]}


def _rank_environment(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _equality_rank(rank: int, port: int, folder: str, out: str, cases: list[str], compile: bool,
                   smollm2: str | None) -> None:
    _rank_environment(rank, port)
    results: dict = {case: run_case(Path(folder), case, WORLD, compile) for case in cases}
    if smollm2 is not None:
        try:
            load(smollm2, device="cpu", compile=False, tp=WORLD)
        except KeepKVError as err:
            results["indivisible"] = str(err)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _dying_rank(rank: int, port: int, folder: str, out: str) -> None:
    _rank_environment(rank, port)
    os.environ["KEEPKV_TP_TIMEOUT"] = "30"
    from keepkv.distributed.group import peer_failure_as_error

    model = load(Path(folder), device="cpu", compile=False, tp=WORLD)
    if rank == 1:
        os._exit(3)  # dies after joining the group, before the first collective
    started = time.perf_counter()
    try:
        with peer_failure_as_error(rank, 30.0):
            model.generate(prompt_text(), max_new_tokens=4)
        message = "no error"
    except KeepKVError as err:
        message = str(err)
    (Path(out) / "survivor.json").write_text(json.dumps({"message": message,
                                                          "seconds": time.perf_counter() - started}))
    os._exit(0)  # the group lost a member: skip the exit-time teardown


def spawn(target, *args) -> None:
    """Run ``target(rank, port, *args)`` in 2 fresh processes; fail (never hang) past ``SPAWN_TIMEOUT``."""
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, port, *args)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, f"tensor-parallel ranks still running after {SPAWN_TIMEOUT}s"


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return write_tiny_qwen(tmp_path_factory.mktemp("tp-tiny"))


def assert_ranks_equal_one_process(ranks: list[dict], single: dict, case: str) -> None:
    for rank, result in enumerate(ranks):
        assert result["text"] == single["text"], f"{case}: rank {rank} generated other tokens"
        for layer, (positions, votes) in enumerate(zip(result["positions"], result["log_votes"])):
            heads = positions.shape[1]
            mine = slice(rank * heads, (rank + 1) * heads)
            assert torch.equal(positions, single["positions"][layer][:, mine]), (
                f"{case}: layer {layer} rank {rank} kept other entries than the single process")
            torch.testing.assert_close(votes, single["log_votes"][layer][:, mine], rtol=0, atol=1e-5)


def test_tp_matches_one_process_and_refuses_indivisible_heads(tiny_qwen, tmp_path, smollm2_gguf):
    cases = list(CASES)
    spawn(_equality_rank, str(tiny_qwen), str(tmp_path), cases, False, str(smollm2_gguf))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for case in cases:
        single = run_case(tiny_qwen, case, 1)
        assert len(single["text"].split()) > 4, f"{case}: the reference stopped early"
        if case != "full":
            assert single["positions"][0].shape[-1] < PROMPT_TOKENS, f"{case}: nothing was compressed"
        assert_ranks_equal_one_process([rank[case] for rank in ranks], single, case)
    for rank in ranks:  # SmolLM2-135M: 9 query heads, 3 KV heads
        assert "divide by 2" in rank["indivisible"] and "3" in rank["indivisible"], rank["indivisible"]


def test_a_dead_rank_ends_the_others_with_a_clear_error(tiny_qwen, tmp_path):
    spawn(_dying_rank, str(tiny_qwen), str(tmp_path))
    survivor = json.loads((tmp_path / "survivor.json").read_text())
    assert "rank 0 lost its peers" in survivor["message"], survivor["message"]
    assert survivor["seconds"] < 30 + 15, survivor


def test_tp_needs_torchrun_and_a_matching_world_size(tiny_qwen, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(KeepKVError, match="torchrun"):
        load(tiny_qwen, device="cpu", compile=False, tp=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(KeepKVError, match="started 3 processes"):
        load(tiny_qwen, device="cpu", compile=False, tp=2)


@pytest.mark.slow
@pytest.mark.compile
def test_tp_compiled_matches_one_process(tiny_qwen, tmp_path):
    """The compiled decode step (all-reduces traced into the graph) and KeepKV's compiled compression (the
    layer-mean all-reduce inside it)."""
    spawn(_equality_rank, str(tiny_qwen), str(tmp_path), ["keepkv"], True, None)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    single = run_case(tiny_qwen, "keepkv", 1, compile=True)
    assert_ranks_equal_one_process([rank["keepkv"] for rank in ranks], single, "keepkv compiled")


def _failure_lines(stderr: str) -> str:
    """A failed torchrun's stderr for the assertion message: every line naming an error or an abort (a rank's own
    ``terminate called ...`` / ``what():`` lines come long before torchrun's summary), then the tail."""
    marks = ("error", "terminate", "what()", "abort", "exception", "signal")
    named = [line for line in stderr.splitlines() if any(mark in line.lower() for mark in marks)]
    return "\n".join(named[:40]) + "\n...\n" + stderr[-2000:]


def test_torchrun_cli_prints_once_and_matches_one_process(tiny_qwen, tmp_path):
    """``torchrun --nproc-per-node 2 -m keepkv generate ... --tp 2``: rank 0 alone prints, the same text as one
    process (``python -m keepkv generate``)."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(prompt_text())
    common = ["generate", str(tiny_qwen), "--kv-budget", "0.1", "--method", "keepkv", "--prompt-file", str(prompt),
              "--max-new-tokens", "12", "--no-compile", "--device", "cpu", "--prefill-chunk-size", "128"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "keepkv", *common, "--tp", "2"]
    ranks = subprocess.run(torchrun, capture_output=True, text=True, timeout=SPAWN_TIMEOUT, env=environment)
    assert ranks.returncode == 0, _failure_lines(ranks.stderr)
    single = subprocess.run([sys.executable, "-m", "keepkv", *common], capture_output=True, text=True,
                            timeout=SPAWN_TIMEOUT, env=environment)
    assert single.returncode == 0, single.stderr[-2000:]
    assert ranks.stdout == single.stdout and len(single.stdout.split()) > 4
    assert ranks.stderr.count("[keepkv] loaded") == 1, ranks.stderr  # only rank 0 speaks
    assert "heads=4/2" in ranks.stderr, ranks.stderr  # rank 0's shard: 4 of 8 query heads, 2 of 4 KV heads
