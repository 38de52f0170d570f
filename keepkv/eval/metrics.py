"""The metrics of ``keepkv eval``, each a small function checked on hand-made cases (tests/eval/test_eval_metrics.py).

- :func:`kl_divergence`: ``KL(p || q) = sum_v p_v (ln p_v - ln q_v)`` from logits (``p`` the full cache's
  next-token distribution, ``q`` the method's), per position;
- :func:`top1_agreement`: fraction of positions where both argmaxes agree;
- :func:`relative_l2`: ``||o_method - o_full|| / ||o_full||`` over the last axis (attention block outputs);
- :func:`perplexity`: ``exp(mean_t -ln p(x_t | x_<t))`` from logits and targets (a uniform model over ``V``
  tokens has perplexity ``V``);
- :func:`needle_found`: exact match for needle-in-a-haystack: the needle's digits appear in the answer;
- :func:`squad_f1`, :func:`squad_exact_match`: the official SQuAD v2 scoring (lower-case, strip punctuation,
  the articles a / an / the and extra white space; token-level F1), maximised over the gold answers.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import torch
from torch import Tensor


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` over the last axis, in nats (float32, >= 0)."""
    log_p = torch.log_softmax(reference_logits.float(), dim=-1)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def top1_agreement(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """``1.0`` where the argmax tokens agree, else ``0.0`` (float32, shape without the vocab axis)."""
    return (reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)).float()


def relative_l2(reference: Tensor, other: Tensor) -> Tensor:
    """``||other - reference||_2 / ||reference||_2`` over the last axis (float32; 0 where both are 0)."""
    reference, other = reference.float(), other.float()
    norm = reference.norm(dim=-1)
    return (other - reference).norm(dim=-1) / norm.clamp_min(torch.finfo(torch.float32).tiny)


def negative_log_likelihoods(logits: Tensor, targets: Tensor) -> Tensor:
    """``-ln p(target)`` for ``logits [..., T, V]`` and integer ``targets [..., T]`` (float32)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets.long()[..., None])[..., 0]


def perplexity(logits: Tensor, targets: Tensor) -> float:
    """``exp(mean -ln p(target))`` over every position."""
    return math.exp(float(negative_log_likelihoods(logits, targets).mean()))


def needle_found(answer: str, needle: str) -> bool:
    """Exact match for NIAH: the needle's digit string appears in the answer as a whole number (separators such
    as ``7,342,819`` are tolerated; ``17342819`` does not match ``7342819``)."""
    digits = re.sub(r"(?<=\d)[,\s](?=\d{3}\b)", "", answer)
    return re.search(rf"(?<!\d){re.escape(needle)}(?!\d)", digits) is not None


def needle_digit_recall(answer: str, needle: str) -> float:
    """Partial credit for NIAH, in ``[0, 1]``: the longest common subsequence of the needle's digits and the
    answer's first whole number, over the needle's length (``7764558`` for ``7342819`` -> 3/7). A finer signal
    than exact match for choosing between close configurations; exact match stays the headline."""
    numbers = re.findall(r"\d+", re.sub(r"(?<=\d)[,\s](?=\d{3}\b)", "", answer))
    if not numbers:
        return 0.0
    said = numbers[0]
    previous = [0] * (len(said) + 1)
    for digit in needle:
        current = [0]
        for j, other in enumerate(said):
            current.append(previous[j] + 1 if digit == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(needle)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 of ``prediction`` against the best of ``answers`` (SQuAD v2 official)."""
    if not answers:
        raise ValueError("squad_f1 needs at least one gold answer")
    return max(_f1(prediction, gold) for gold in answers)


def squad_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer (SQuAD v2 official), else 0.0."""
    if not answers:
        raise ValueError("squad_exact_match needs at least one gold answer")
    return float(any(normalize_answer(prediction) == normalize_answer(gold) for gold in answers))


def first_answer_line(text: str) -> str:
    """The part of a generated answer that is scored: up to the first blank line, stripped."""
    return text.strip().split("\n\n")[0].strip()
