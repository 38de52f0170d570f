"""Every method spec on the **compiled** path (``compile=True``, the default of ``load``) of the real SmolLM2.

Several methods run one after another in one process over one network and one :class:`GenerationEngine` (its
compiled decode step and prefill kernel are shared: every spec uses the same integer budget, window, chunk and
slack, so most specs reuse graphs compiled for an earlier one). The prompt (160 tokens) is prefilled in chunks of
32 into ``B + 32`` slots with ``B = 64``, so compression happens during prefill, at its end and (``W = 32``, 36
new tokens) during decode. The chunk equals the decode slack, so prefill and decode see one cache capacity
(``B + 32``), and one compiled compression per method serves every compression of a spec (during prefill, at its
end, while decoding). A spec with per-layer budgets (PyramidKV's, the cosine schedule) gets the mean budget whose
largest layer holds ``B`` (:func:`spec_budget`; ``B = 63`` is one that all of them can reach), so its cache has
the capacity of the uniform specs and reuses their compiled decode graph instead of compiling its own. Checked
for each spec:

- no NaN / inf logits at any step;
- the cache invariants: after the end-of-prefill compression each layer and head holds at most its layer's slots
  (``B_l``; with Ada-KV head budgets at most ``H_kv B_l`` per layer and row), and while decoding at most its
  capacity; every layer has the same capacity (per-layer budgets are padded, see ``keepkv.cache.manager``);
- layers with different budgets (PyramidKV, D2O, ``layer_budgets="pyramid"``) compile without hitting dynamo's
  reuse limit of the decoder-block region;
- for a few methods the greedy tokens equal the eager (dense reference attention) run;
- KeepKV (the default method): votes add up, and a second generation reruns without recompiling.

The default run covers every spec; the bfloat16 run is marked ``slow``
(``pytest -m slow tests/methods/test_methods_compiled.py``).
"""

from __future__ import annotations

import pytest
import torch

from keepkv.cache.manager import CacheManager
from keepkv.cache.methods import available_methods
from keepkv.generate import GenerationEngine
from keepkv.models.loading import resolve_method

pytestmark = [pytest.mark.compile, pytest.mark.real_model]

BUDGET, CHUNK, SLACK, PROMPT, NEW = 63, 32, 32, 160, 36  # CHUNK == SLACK: one capacity, B + 32, throughout
COMMON = dict(window=8)  # one observation-window length for every spec: the decode graphs differ less
SPECS: dict[str, tuple[str, dict]] = {
    **{name: (name, {} if name == "full" else dict(COMMON)) for name in available_methods()},
    "adakv-snapkv": ("adakv-snapkv", dict(COMMON)),
    "adakv-pyramidkv": ("adakv-pyramidkv", dict(COMMON)),
    "snapkv+keepkv": ("snapkv+keepkv", dict(COMMON)),
    "pyramidkv+keepkv": ("pyramidkv+keepkv", dict(COMMON)),
    "snapkv@pyramid": ("snapkv", dict(COMMON, layer_budgets="pyramid")),
    "keepkv@cosine": ("keepkv", dict(COMMON, layer_budgets="cosine")),
    "keepkv@attention_only": ("keepkv", dict(COMMON, value_norm_power=0.0)),  # the default before 2026-12-06
    "keepkv@once": ("keepkv", dict(COMMON, prefill_compression="once")),  # a manager option, not the method's
    "keepkv@recent": ("keepkv", dict(COMMON, recent_fraction=0.5)),
    "keepkv@output": ("keepkv", dict(COMMON, value_weighting="output")),  # reads each layer's o_proj
    "keepkv@blend": ("keepkv", dict(COMMON, selection="blend", value_weighting="output")),
    "keepkv@floor": ("keepkv", dict(COMMON, selection="floor", value_weighting="output")),  # split budget
}
# the default run: every method and option spec (what users run is compiled); the bfloat16 run is marked slow.
# Specs whose cache has the capacity and flags of an earlier spec reuse its decode graph (a few seconds each);
# a new capacity or cache flag compiles one more decode graph
DEFAULT_SPECS = tuple(SPECS)
EAGER_PARITY = ("full", "streamingllm", "pyramidkv", "snapkv@pyramid", "d2o", "keepkv@once", "keepkv@output",
                "keepkv@attention_only", "keepkv@recent", "keepkv@blend", "keepkv@floor")
TEXT_REPEAT = 8


def spec_budget(method, num_layers: int) -> int:
    """The largest mean budget ``<= BUDGET`` whose largest layer needs the slots of a uniform ``BUDGET`` (the
    budget itself for uniform methods): every spec's cache then has one of a few capacities."""
    slots = method.slots_for_budget(BUDGET)
    for budget in range(BUDGET, 0, -1):
        if max(method.slots_for_budget(b) for b in method.plan_layer_budgets(budget, num_layers)) == slots:
            return budget
    raise AssertionError(f"no mean budget gives {method.name} a largest layer of {slots} slots")


def make_manager(network, spec: str, compile: bool):
    name, options = SPECS[spec]
    options = dict(options)
    prefill_compression = options.pop("prefill_compression", "chunked")
    dtype, device = network.model.embed_tokens.weight.dtype, network.inv_freq.device
    _, method = resolve_method(name, None if name == "full" else BUDGET, options)
    if method.keeps_everything:
        return CacheManager(network.config, dtype, device, method, compiled_ops=compile)
    return CacheManager(network.config, dtype, device, method, spec_budget(method, network.config.num_layers),
                        SLACK, prefill_compression, compiled_ops=compile)


def use_manager(engine: GenerationEngine, manager) -> None:
    engine.cache_manager = manager
    manager.bind_network(engine.network)


def run(engine: GenerationEngine, prompt: torch.Tensor) -> dict:
    """Prefill, end of prefill, ``NEW - 1`` greedy decode steps; what the checks need."""
    manager = engine.cache_manager
    compressed = not manager.keeps_everything
    valid = torch.ones_like(prompt, dtype=torch.bool)
    engine.prepare_caches(1, prompt.shape[1], NEW)
    finite, tokens = [], []
    with torch.inference_mode():
        logits, positions = engine.prefill(prompt, valid)
        engine.end_prefill()
        after_prefill = manager.entries_per_head()
        finite.append(bool(torch.isfinite(logits).all()))
        token = logits.argmax(-1)
        tokens.append(int(token))
        first_logits = logits.float().clone()
        kept = [cache.positions.clone() for cache in manager.caches]
        most_while_decoding = after_prefill.clone()
        for _ in range(NEW - 1):
            logits = engine.decode_step(token, positions)
            positions = positions + 1
            finite.append(bool(torch.isfinite(logits).all()))
            token = logits.argmax(-1)
            tokens.append(int(token))
            most_while_decoding = torch.maximum(most_while_decoding, manager.entries_per_head())
    return dict(
        tokens=tokens, first_logits=first_logits, kept=kept, finite=finite, after_prefill=after_prefill, most=most_while_decoding,
        capacities=[cache.capacity for cache in manager.caches],
        slots=list(manager.layer_slots) if compressed else None,
        budgets=list(manager.layer_budgets) if compressed else None,
        compressions=manager.compressions if compressed else 0, manager=manager,
    )


def prompt_ids(model) -> torch.Tensor:
    from pathlib import Path

    text = (Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt").read_text()
    ids = model.tokenizer.encode(text)[:PROMPT]
    assert len(ids) == PROMPT
    return torch.tensor([ids])


def run_all(gguf, dtype, specs) -> dict[str, dict]:
    from keepkv.models import load

    model = load(gguf, dtype=dtype, device="cpu", compile=True, prefill_chunk_size=CHUNK)
    engine = model.engine
    prompt = prompt_ids(model)
    results = {spec: (use_manager(engine, make_manager(model.network, spec, True)), run(engine, prompt))[1]
               for spec in specs}
    for result in results.values():
        result.update(engine=engine, prompt=prompt)
    return results


@pytest.fixture(scope="module")
def compiled_runs(smollm2_gguf):
    torch.set_num_threads(2)
    return run_all(smollm2_gguf, torch.float32, DEFAULT_SPECS)


@pytest.fixture(scope="module")
def eager_runs(smollm2_eager):
    engine = GenerationEngine(smollm2_eager.network, compile=False, prefill_chunk_size=CHUNK)
    prompt = prompt_ids(smollm2_eager)
    results = {}
    for spec in EAGER_PARITY:
        use_manager(engine, make_manager(smollm2_eager.network, spec, False))
        results[spec] = run(engine, prompt)
    return results


def check_invariants(spec: str, result: dict) -> None:
    assert all(result["finite"]), f"{spec}: non-finite logits at steps {result['finite']}"
    capacities = result["capacities"]
    assert len(set(capacities)) == 1, f"{spec}: layers of different capacities {capacities}"
    most = result["most"]  # [layers, batch, kv_heads]
    assert (most <= capacities[0]).all()
    if result["slots"] is None:
        return
    manager = result["manager"]
    # at least the end of prefill; methods compressing during decode also compress there (W = 32 < 36 new tokens)
    least = 2 if manager.method.compresses_during_decode else 1
    assert result["compressions"] >= least, f"{spec}: {result['compressions']} compressions"
    slots = torch.tensor(result["slots"])[:, None, None]
    budgets = torch.tensor(result["budgets"])[:, None]
    after = result["after_prefill"]
    adakv = getattr(getattr(manager.method, "selector", manager.method), "head_budgets", "uniform") == "adakv"
    if adakv:
        assert (after <= slots).all() and (after.sum(dim=-1) <= budgets * after.shape[-1]).all(), spec
    else:
        assert (after <= budgets[..., None]).all(), f"{spec}: {after.amax(dim=(1, 2)).tolist()} > {result['budgets']}"
    assert (most <= slots + manager.room).all(), spec
    assert sum(result["budgets"]) <= manager.budget * len(result["budgets"]) + len(result["budgets"])


@pytest.mark.parametrize("spec", DEFAULT_SPECS)
def test_compiled_method_runs_with_cache_invariants(spec, compiled_runs):
    check_invariants(spec, compiled_runs[spec])


def test_per_layer_budgets_share_one_capacity(compiled_runs):
    """The specs whose layers have different budgets (the crash of issue 14) ran compiled, one capacity."""
    for spec in ("pyramidkv", "d2o", "adakv-pyramidkv", "pyramidkv+keepkv", "snapkv@pyramid"):
        budgets = compiled_runs[spec]["budgets"]
        assert len(set(budgets)) > 1, f"{spec}: expected per-layer budgets, got {budgets}"
        assert len(set(compiled_runs[spec]["capacities"])) == 1


def test_compiled_keepkv_votes_add_up_and_a_second_generation_does_not_recompile(compiled_runs):
    """The default method on the compiled path: it compressed during prefill, at its end and while decoding;
    every live entry holds at least one vote and a head's votes never exceed the tokens it has seen; keys stay
    finite. A second generation of the same shape on the same manager (what a user's next ``generate()`` does)
    runs with recompilation forbidden, after every other spec compiled its own graphs, and gives the same tokens."""
    result = compiled_runs["keepkv"]
    manager, engine = result["manager"], result["engine"]
    assert result["compressions"] >= 3
    seen = PROMPT + NEW - 1
    live = manager.entries_per_head()
    votes = torch.stack([cache.log_votes.exp().sum(-1) for cache in manager.caches])
    assert bool((votes <= seen + 1e-2).all()) and bool((votes >= live - 1e-3).all())
    assert manager.method.stats.merged > 0
    assert torch.isfinite(torch.stack([cache.keys for cache in manager.caches])).all()
    use_manager(engine, manager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(engine, result["prompt"])
    assert again["tokens"] == result["tokens"]


def kept_mismatch(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The share of kept entries (token positions per layer, batch row and KV head) held by one run and not the
    other."""
    differ = total = 0
    for pa, pb in zip(a, b):
        for row_a, row_b in zip(pa.flatten(0, 1).tolist(), pb.flatten(0, 1).tolist()):
            kept_a, kept_b = set(row_a) - {-1}, set(row_b) - {-1}
            differ += len(kept_a ^ kept_b) // 2
            total += max(len(kept_a), len(kept_b))
    return differ / max(total, 1)


@pytest.mark.parametrize("spec", EAGER_PARITY)
def test_compiled_greedy_tokens_equal_eager(spec, compiled_runs, eager_runs):
    """The compiled path computes the eager path's method. Where both keep the same entries at the end of prefill,
    every greedy token is the same. A ranking may differ where two scores tie to float noise (the compiled and the
    eager attention sum in different orders; SnapKV's max-pooled scores with PyramidKV's small upper-layer budgets
    tie often, and which side of the budget a tied pair lands on depends on the CPU's kernels): then at most 1% of
    the kept entries may differ (a wrong compiled selection differs in far more), and the first logits and token
    still agree; later tokens may legitimately differ."""
    compiled, eager = compiled_runs[spec], eager_runs[spec]
    assert compiled["budgets"] == eager["budgets"]
    mismatch = kept_mismatch(compiled["kept"], eager["kept"])
    if mismatch == 0:
        assert compiled["tokens"] == eager["tokens"], spec
        return
    assert mismatch <= 0.01, f"{spec}: {mismatch:.1%} of the kept entries differ between compiled and eager"
    gap = float((compiled["first_logits"] - eager["first_logits"]).abs().max())
    assert gap < 0.25 and compiled["tokens"][0] == eager["tokens"][0], f"{spec}: first logits differ by {gap}"


@pytest.mark.slow
def test_compiled_methods_bfloat16(smollm2_gguf):
    torch.set_num_threads(2)
    for spec, result in run_all(smollm2_gguf, torch.bfloat16, list(SPECS)).items():
        check_invariants(spec, result)
