"""The lm-evaluation-harness model (:mod:`keepkv.integrations.lm_eval`) on the real SmolLM2 (eager, float32).

Claims: with the full cache, ``loglikelihood`` equals the log-softmax of one teacher-forced forward summed over the
continuation (1e-4; batched, left-padded, empty context included) and ``is_greedy`` its argmax test;
``loglikelihood_rolling`` equals the same over the document (one window, and lm-eval's disjoint windows when
``max_length`` is short); ``generate_until`` gives ``LanguageModel.generate``'s text (stop strings, batches);
at a 20% KeepKV budget the greedy continuation of keepkv's own engine scores ``is_greedy`` with a log-probability
different from the full cache's while the cache really holds fewer entries; ``simple_evaluate`` runs local JSONL
tasks of all three request types; the command line (``python -m keepkv.integrations.lm_eval``; marked slow, as
lm-eval's own start-up indexes its ~15k task configs) runs one with model args passed through to ``load``; bad
model_args and gen_kwargs are KeepKVErrors naming what is allowed. Everything is offline (local JSON data files,
``HF_*_OFFLINE``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_ENVIRONMENT_BEFORE = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
for _name in OFFLINE_VARIABLES:  # before lm-eval (and datasets) are imported: they read these at import
    os.environ.setdefault(_name, "1")


@pytest.fixture(scope="module", autouse=True)
def _offline_only_for_this_module():
    """The offline variables set above stay for these tests only (other test files fake hub downloads)."""
    yield
    for name, value in _ENVIRONMENT_BEFORE.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install -e '.[lm-eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from keepkv.errors import KeepKVError  # noqa: E402
from keepkv.integrations.lm_eval import KeepKVLM  # noqa: E402
from keepkv.sampling import SamplingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = (Path(__file__).parents[1] / "data" / "jargon_ch4-6.txt").read_text()
PAIRS = [("The capital of France is", " Paris"), ("One, two, three,", " four, five"), ("", "Hello world")]
PROMPTS = ["The capital of France is", "List three colours:\n1."]


def instances(request_type: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``ln p(ids[t] | ids[:t])`` for t >= 1 from one teacher-forced forward of the full cache."""
    logits = model.logits(torch.tensor([ids]))[0, :-1].double()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def full_lm(smollm2_eager):
    return KeepKVLM(pretrained=smollm2_eager, batch_size=3)


def test_loglikelihood_equals_teacher_forced_forward(full_lm, smollm2_eager):
    results = full_lm.loglikelihood(instances("loglikelihood", PAIRS))
    tokenizer = smollm2_eager.tokenizer
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        if context:
            context_ids = tokenizer.encode(context)
            ids = tokenizer.encode(context + continuation)
        else:
            context_ids = [full_lm.prefix_token_id]
            ids = context_ids + tokenizer.encode(continuation, add_bos=False)
        assert len(ids) > len(context_ids)
        scored = direct_logprobs(smollm2_eager, ids)[len(context_ids) - 1:]
        assert logprob == pytest.approx(float(scored.sum()), abs=1e-4)
        logits = smollm2_eager.logits(torch.tensor([ids]))[0, len(context_ids) - 1:-1]
        assert greedy == bool((logits.argmax(-1) == torch.tensor(ids[len(context_ids):])).all())
    # batching does not change a row: the same requests one at a time
    alone = KeepKVLM(pretrained=smollm2_eager).loglikelihood(instances("loglikelihood", PAIRS[:2]))
    assert [round(v, 4) for v, _ in alone] == [round(v, 4) for v, _ in results[:2]]


def test_loglikelihood_rolling_equals_forward(full_lm, smollm2_eager):
    text = TEXT[:200]
    ids = smollm2_eager.tokenizer.encode(text, add_bos=False)
    (value,) = full_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert value == pytest.approx(float(direct_logprobs(smollm2_eager, [full_lm.prefix_token_id] + ids).sum()),
                                  abs=1e-3)
    # lm-eval's disjoint rolling windows: max_length 16 -> windows predicting ids[0:16], [16:32], ... each from at
    # most 16 tokens of input (the last window keeps a full-length input and scores only its new tokens)
    short = KeepKVLM(pretrained=smollm2_eager, max_length=16, batch_size=4)
    (windowed,) = short.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    padded = [full_lm.prefix_token_id] + ids
    expected = 0.0
    for start in range(0, len(ids), 16):
        end = min(start + 16, len(ids))
        window = padded[max(end - 16, 0): end + 1]  # 16 inputs (fewer at the start) + the last target
        expected += float(direct_logprobs(smollm2_eager, window)[-(end - start):].sum())
    assert len(ids) > 32 and windowed == pytest.approx(expected, abs=1e-3)
    assert windowed < value  # less context, lower likelihood


def test_generate_until_equals_generate(full_lm, smollm2_eager):
    kwargs = {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False}
    batched = full_lm.generate_until(instances("generate_until", [(p, kwargs) for p in PROMPTS]))
    assert batched == smollm2_eager.generate(PROMPTS, max_new_tokens=8, stop=["\n", "."])
    one = KeepKVLM(pretrained=smollm2_eager).generate_until(instances("generate_until", [(PROMPTS[0], kwargs)]))
    assert one == [smollm2_eager.generate(PROMPTS[0], max_new_tokens=8, stop=["\n", "."])]
    assert all("\n" not in text and "." not in text for text in batched)


def test_compressed_budget_scores_the_engines_own_greedy_output(smollm2_eager, full_lm):
    # window=8 (a method option passed through): 4 sinks + 8 recent + 1 protected entries <= 20% of 100 tokens
    lm = KeepKVLM(pretrained=smollm2_eager, kv_budget=0.2, method="keepkv", window=8, decode_slack=4)
    assert lm.model.method == "keepkv" and lm.model.network is smollm2_eager.network
    assert lm.model.method_object.window == 8
    tokenizer = smollm2_eager.tokenizer
    context_ids = tokenizer.encode(TEXT)[:100]
    prompt = torch.tensor([context_ids])
    tokens = [int(t[0]) for t in lm.model.engine.generate_tokens(prompt, torch.ones_like(prompt, dtype=torch.bool),
                                                                 6, SamplingConfig(0.0))]
    (logprob, greedy), = lm.score_continuations([(context_ids, tokens)])
    assert greedy and -60.0 < logprob < 0.0
    report = lm.model.cache_report()
    assert report["budget"] == 20 and report["entries_per_head_max"] <= 20 + 4 < len(context_ids)
    (full_logprob, _), = full_lm.score_continuations([(context_ids, tokens)])
    assert abs(full_logprob - logprob) > 1e-4  # the compressed cache changed the scores
    context = tokenizer.decode(context_ids)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 6}
    assert lm.generate_until(instances("generate_until", [(context, kwargs)])) == [
        lm.model.generate(context, max_new_tokens=6, stop=["\n\n"])]


def test_bad_model_args_and_gen_kwargs(smollm2_eager, full_lm):
    with pytest.raises(KeepKVError, match="kv_budget"):
        KeepKVLM.create_from_arg_string("pretrained=SmolLM2-135M-Instruct,kv_budgte=0.2")
    with pytest.raises(KeepKVError, match="window"):  # a method option of another method: keepkv's are listed
        KeepKVLM(pretrained=smollm2_eager, kv_budget=0.2, method="keepkv", windw=8)
    with pytest.raises(KeepKVError, match="pretrained"):
        KeepKVLM(kv_budget=0.2)
    with pytest.raises(KeepKVError, match="batch_size"):
        KeepKVLM(pretrained=smollm2_eager, batch_size="many")
    with pytest.raises(KeepKVError, match="kv_budget"):
        KeepKVLM(pretrained=smollm2_eager, kv_budget=1.5)
    with pytest.raises(KeepKVError, match="until, max_gen_toks"):
        full_lm.generate_until(instances("generate_until", [("Hi", {"num_beams": 4})]))
    assert KeepKVLM(pretrained=smollm2_eager, batch_size="auto:4").batch_size == 8


def write_tasks(folder: Path) -> Path:
    """Three tiny local tasks (multiple choice, generation, perplexity) over JSONL files in ``folder``."""
    mc = [{"question": "The capital of France is", "choices": ["Paris", "Berlin", "Madrid"], "label": 0},
          {"question": "One, two, three,", "choices": ["four", "seven", "dog"], "label": 0},
          {"question": "The opposite of hot is", "choices": ["cold", "green", "seven"], "label": 0}]
    gen = [{"prompt": PROMPTS[0], "answer": "Paris"}, {"prompt": "One, two, three,", "answer": "four"}]
    ppl = [{"text": TEXT[:120]}]
    common = {"dataset_path": "json", "test_split": "test"}
    specs = {
        "keepkv_tiny_mc": (mc, {"output_type": "multiple_choice", "doc_to_text": "{{question}}",
                                "doc_to_target": "label", "doc_to_choice": "choices",
                                "metric_list": [{"metric": "acc"}]}),
        "keepkv_tiny_gen": (gen, {"output_type": "generate_until", "doc_to_text": "{{prompt}}",
                                  "doc_to_target": "{{answer}}",
                                  "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
                                  "metric_list": [{"metric": "exact_match", "regexes_to_ignore": [" "]}]}),
        "keepkv_tiny_ppl": (ppl, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                                  "doc_to_target": "{{text}}",
                                  "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}),
    }
    for name, (rows, spec) in specs.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        kwargs = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf_datasets")}
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **common, "dataset_kwargs": kwargs, **spec}))
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def test_simple_evaluate_on_local_tasks(full_lm, smollm2_eager, task_folder):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=full_lm, tasks=["keepkv_tiny_mc", "keepkv_tiny_gen", "keepkv_tiny_ppl"],
                              task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
                              log_samples=True)
    scores = results["results"]
    answers = smollm2_eager.generate([PROMPTS[0], "One, two, three,"], max_new_tokens=6, stop=["\n", "."])
    expected_em = sum(a.replace(" ", "") == b for a, b in zip(answers, ["Paris", "four"])) / 2
    assert scores["keepkv_tiny_gen"]["exact_match,none"] == pytest.approx(expected_em)
    responses = sorted(s["resps"][0][0] for s in results["samples"]["keepkv_tiny_gen"])
    assert responses == sorted(answers)
    mc = full_lm.loglikelihood(instances("loglikelihood", [("The capital of France is", c)
                                                           for c in (" Paris", " Berlin", " Madrid")]))
    first_right = max(range(3), key=lambda i: mc[i][0]) == 0
    assert 0.0 <= scores["keepkv_tiny_mc"]["acc,none"] <= 1.0
    first_sample = next(s for s in results["samples"]["keepkv_tiny_mc"] if s["doc_id"] == 0)
    assert first_sample["acc"] == float(first_right)
    (document_ll,) = full_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(TEXT[:120],)]))
    words, size = len(re.split(r"\s+", TEXT[:120])), len(TEXT[:120].encode())
    assert scores["keepkv_tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-document_ll / words), rel=1e-4)
    assert scores["keepkv_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-document_ll / size / math.log(2),
                                                                             rel=1e-4)


@pytest.mark.slow  # ~35 s on 2 cores, most of it lm-eval's own start-up (its CLI indexes ~15k built-in task configs)
def test_command_line_runs_a_local_task(smollm2_gguf, task_folder, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    model_args = f"pretrained={smollm2_gguf},compile=False,kv_budget=48,method=keepkv,window=16"
    run = subprocess.run(
        [sys.executable, "-m", "keepkv.integrations.lm_eval", "--model", "keepkv", "--model_args", model_args,
         "--tasks", "keepkv_tiny_mc", "--include_path", str(task_folder), "--output_path", str(tmp_path / "out"),
         "--batch_size", "2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "keepkv_tiny_mc" in run.stdout and "acc" in run.stdout
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert 0.0 <= saved["results"]["keepkv_tiny_mc"]["acc,none"] <= 1.0
    assert "kv_budget" in json.dumps(saved["config"]["model_args"])
