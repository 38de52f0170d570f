"""``keepkv.eval`` on the real SmolLM2 with short contexts: the engine hooks of the shared-prefill protocol and a
tiny end-to-end run of ``keepkv eval all --grid quick`` (resumable, report written)."""

from __future__ import annotations

import json

import pytest
import torch

from keepkv.eval.results import REQUIRED_KEYS, MethodConfig


@pytest.fixture(scope="module")
def eval_model(smollm2_gguf):
    from keepkv.eval.session import EvalModel

    return EvalModel(str(smollm2_gguf))


def _prompt(model, tokens: int) -> list[int]:
    from keepkv.eval.data import jargon_text

    return model.tokenizer.encode(jargon_text()[: tokens * 8])[:tokens]


def test_full_start_from_prefill_then_extend_matches_one_teacher_forced_pass(eval_model):
    ids = _prompt(eval_model, 150)
    context, suffix = ids[:120], ids[120:]
    prefill = eval_model.shared_prefill([context], [MethodConfig("full")])
    engine = eval_model.engine_for(MethodConfig("full"), 1.0)
    engine.start_from_prefill(prefill.caches, len(context), len(suffix))
    positions = torch.arange(len(context), len(ids))[None]
    logits = engine.extend(torch.tensor([suffix]), positions, torch.ones_like(positions, dtype=torch.bool))
    reference = eval_model.lm.logits(torch.tensor([ids]))[:, len(context):]
    assert torch.allclose(logits, reference, atol=2e-3, rtol=0)
    assert int(prefill.caches[0].cursor.max()) == len(context)  # the shared prefill is not modified


@pytest.mark.parametrize("name", ["snapkv", "h2o", "keepkv:zip", "adakv-snapkv"])
def test_compressing_a_shared_prefill_equals_the_engine_own_prefill(eval_model, name):
    """One shared prefill (window and accumulated attention for every method) compressed per method gives the
    same cache as that method's own prefill + end of prefill (prompt shorter than one chunk)."""
    config = MethodConfig.parse(name)
    context = _prompt(eval_model, 200)
    others = [MethodConfig.parse(x) for x in ("h2o", "snapkv", "keepkv:minnorm")]
    prefill = eval_model.shared_prefill([context], [config, *others])
    shared = eval_model.engine_for(config, 0.3)
    shared.start_from_prefill(prefill.caches, len(context), 8)
    own = eval_model.engine_for(config, 0.3)
    ids = torch.tensor([context])
    own.prepare_caches(1, len(context), 8)
    with torch.inference_mode():
        own.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    own.end_prefill()
    assert shared.cache_manager.budget == own.cache_manager.budget == 60
    for a, b in zip(shared.caches, own.caches):
        assert a.capacity == b.capacity
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.log_votes, b.log_votes, atol=1e-5)
        # merged keys (ZIP) reach |k| ~ 100 and amplify float32 rounding of the two prefills: relative tolerance
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-3)
        assert torch.allclose(a.values, b.values, atol=1e-4)


def test_query_agnostic_answers_compress_with_the_agnostic_copy(eval_model):
    """The eval's query-agnostic protocol compresses with the method's ``for_query_agnostic()``: default KeepKV
    then answers and keeps exactly what ``last_query_weight=1`` keeps, and the query-aware protocol what the
    default (window mean) keeps."""
    context = _prompt(eval_model, 200)
    question = _prompt(eval_model, 230)[200:]
    configs = [MethodConfig.parse(x) for x in ("keepkv", "keepkv@last_query_weight=1.0")]
    prefill = eval_model.shared_prefill([context], configs)
    def run(config, agnostic):
        return eval_model.answer(prefill, config, 0.3, [question], 6, query_agnostic=agnostic)
    default, newest = configs
    assert run(default, True) == run(newest, False) == run(newest, True)
    engines = [eval_model.engine_for(default, 0.3, query_agnostic=a) for a in (True, False)]
    for engine in engines:
        engine.start_from_prefill(prefill.caches, len(context), 8)
    agnostic, aware = ([c.positions.sort(dim=-1).values for c in e.caches] for e in engines)
    assert not all(torch.equal(a, b) for a, b in zip(agnostic, aware))


def test_a_question_longer_than_the_decode_slack_fits_after_the_compression(eval_model):
    """Query-agnostic: a 40-token question after a 200-token context compressed to 30% by KeepKV (which compresses
    every ``decode_slack`` new entries while decoding), with a decode slack of 16: the question is fed whole (it
    overflowed the cache before), and the first answer token (read before any decode compression) is the one
    with room to spare."""
    context, question = _prompt(eval_model, 200), _prompt(eval_model, 240)[200:]
    config = MethodConfig.parse("keepkv")
    prefill = eval_model.shared_prefill([context], [config])
    def run(slack, new_tokens):
        return eval_model.answer(prefill, config, 0.3, [question], new_tokens, decode_slack=slack,
                                 query_agnostic=True)
    assert run(16, 1) == run(64, 1)
    (tokens,), _ = run(16, 24)
    assert len(tokens) >= 1


@pytest.mark.parametrize("name", ["keepkv", "snapkv"])
def test_prefill_compression_once_equals_compressing_the_whole_prompt(eval_model, name):
    """``prefill_compression="once"``: a prompt of several chunks is kept whole through prefill and compressed
    once at its end, which is the shared-prefill protocol (full prefill, then compress); the chunked schedule
    compresses during prefill and keeps other entries."""
    config = MethodConfig.parse(name)
    context = _prompt(eval_model, 400)
    prefill = eval_model.shared_prefill([context], [config])
    shared = eval_model.engine_for(config, 0.15)
    shared.start_from_prefill(prefill.caches, len(context), 8)
    ids = torch.tensor([context])
    kept = {}
    for schedule in ("once", "chunked"):
        own = eval_model.engine_for(config, 0.15)
        own.prefill_chunk_size = 96
        own.cache_manager.prefill_compression = schedule
        own.prepare_caches(1, len(context), 8)
        with torch.inference_mode():
            own.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
            compressed_in_prefill = own.cache_manager.compressions
            own.end_prefill()
        kept[schedule] = [cache.positions.clone() for cache in own.caches]
        if schedule == "once":
            assert (compressed_in_prefill, own.cache_manager.compressions) == (0, 1)
            for a, b in zip(shared.caches, own.caches):
                assert torch.equal(a.positions, b.positions)
                assert torch.allclose(a.log_votes, b.log_votes, atol=1e-5)
                assert torch.allclose(a.values, b.values, atol=1e-4)
        else:
            assert compressed_in_prefill >= 2
    assert any(not torch.equal(a, b) for a, b in zip(kept["once"], kept["chunked"]))


def test_prefill_compression_is_checked():
    from keepkv.errors import KeepKVError
    from keepkv.models import load

    with pytest.raises(KeepKVError, match="prefill_compression.*'chunked', 'once'"):
        load("SmolLM2-135M-Instruct", kv_budget=0.1, prefill_compression="all-at-once")
    with pytest.raises(KeepKVError, match="prefill_compression.*no kv_budget"):
        load("SmolLM2-135M-Instruct", prefill_compression="once")


def test_quick_grid_end_to_end_is_resumable(tmp_path, smollm2_gguf, monkeypatch):
    """`keepkv eval all --grid quick` (SmolLM2, full + keepkv at one budget, tiny cells) writes schema-valid rows,
    the report and PNGs; a second run recomputes nothing."""
    pytest.importorskip("matplotlib")
    from keepkv.cli import main
    from keepkv.eval import grid

    monkeypatch.setattr(grid, "SMOLLM2", str(smollm2_gguf))
    quick = [grid.ModelGrid(str(smollm2_gguf), **{k: getattr(grid.GRIDS["quick"][0], k) for k in (
        "configs", "budgets", "fidelity_context", "fidelity_steps", "ppl_tokens", "niah_lengths", "niah_depths",
        "qa_count", "qa_context", "qa_batch")})]
    monkeypatch.setitem(grid.GRIDS, "quick", quick)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- eval:begin x -->\n<!-- eval:end -->\n")
    results = tmp_path / "results"
    prompts = tmp_path / "prompts.jsonl"
    assert main(["eval", "niah", "--model", str(smollm2_gguf), "--results", str(results), "--export-prompts",
                 str(prompts), "--export-only", "--no-progress"]) == 0
    exported = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert exported and {"task", "cell", "context", "question", "answers", "context_tokens", "depth",
                         "max_new_tokens", "chat"} <= set(exported[0])
    assert main(["eval", "all", "--grid", "quick", "--results", str(results), "--readme", str(readme),
                 "--no-progress"]) == 0
    rows = [json.loads(line) for path in sorted(results.glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert {r["task"] for r in rows} == {"fidelity", "ppl", "niah", "qa"}
    assert all(set(REQUIRED_KEYS) <= set(r) for r in rows)
    niah = [r for r in rows if r["task"] == "niah"]
    assert {r["method"] for r in niah} == {"full", "keepkv"}
    compressed = [r for r in rows if r["method"] == "keepkv"]
    assert all(0 < r["kept_entries_per_head"] < r.get("context_tokens", 10**9) for r in compressed)
    full_niah = [r for r in niah if r["method"] == "full"]
    assert all(r["value"] == 1.0 for r in full_niah), [r["answer"] for r in full_niah]  # the prompt works
    assert (results / "REPORT.md").is_file() and "keepkv:minnorm" in readme.read_text()
    before = sum(1 for path in results.glob("*.jsonl") for _ in path.open())
    assert main(["eval", "all", "--grid", "quick", "--results", str(results), "--no-progress"]) == 0
    assert sum(1 for path in results.glob("*.jsonl") for _ in path.open()) == before
