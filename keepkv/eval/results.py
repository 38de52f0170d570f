"""Results schema and the resumable JSON-lines store of ``keepkv eval``.

**Row schema** (one JSON object per line, in any ``*.jsonl`` file under a results directory)::

    {"task": "niah" | "qa" | "ppl" | "fidelity", "metric": str, "value": float,
     "model": str, "method": str, "variant": str, "budget": float | int,
     "kept_entries_per_head": float, "cell": str, "seed": int,
     "engine": "keepkv" | "kvpress" | ..., "keepkv_version": str, "torch_version": str, ...extra keys}

- ``method`` is the registry name (``full``, ``snapkv``, ``keepkv``, ``snapkv+keepkv``, ``adakv-snapkv`` ...);
  ``variant`` is KeepKV's merge variant (``zip`` | ``convex`` | ``keep-key`` | ``minnorm``) for ``keepkv`` and
  ``X+keepkv``, ``""`` otherwise.
- ``budget`` is what was asked (a fraction of the context, ``1.0`` for ``full``); ``kept_entries_per_head`` is
  what the cache actually held after compressing the context (mean over layers, rows and KV heads) — the budget
  that is reported.
- ``cell`` names the unit of data (``"ctx2048/depth50"``, ``"doc0"``, ``"q3"`` ...); rows of one (task, model,
  method, variant, budget) over all cells are averaged in the report.
- Extra keys (``per_layer``, ``per_step``, ``answer``, ``context_tokens`` ...) are allowed and ignored by the table.

**Prompts for peer engines**: ``keepkv eval niah|qa ... --export-prompts FILE.jsonl`` writes one JSON line per
cell: ``{"task", "cell", "context", "question", "answers": [...], "context_tokens", "depth" (niah only),
"max_new_tokens", "chat": true}``. ``context`` is the text compressed query-agnostically (for ``chat`` the user
turn begins with it: render the model's chat template on ``context + question`` as one user message and split at
the question), ``question`` the text appended after compression, decoded greedily. NIAH cells also carry
``answer_prefix`` (RULER-style): the assistant turn is opened and starts with it (fed after the compression too).

**Peer rows** (e.g. kvpress, built in ``tools/peers/``) use the same keys with ``"engine": "kvpress"``, written
to files under the same results directory (e.g. ``results/eval/peers/*.jsonl``); :mod:`keepkv.eval.report` reads
every ``*.jsonl`` below the directory recursively and puts peer rows in the same table (method label suffixed
with ``[kvpress]``).

**Resumability**: :class:`ResultStore` appends rows of one unit of work (one method configuration at one budget on
one cell group) together and flushes; :meth:`ResultStore.done` tells whether a unit's rows exist, so an
interrupted run restarts where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_KEYS = (
    "task", "metric", "value", "model", "method", "variant", "budget", "kept_entries_per_head", "cell", "seed",
    "engine", "keepkv_version", "torch_version",
)


OPTION_SEPARATOR = "@"


def parse_option_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, anything else stays a string (``"layer"``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class MethodConfig:
    """One method configuration of a comparison: a registry name, KeepKV's merge variant ("" when none) and
    extra options (sorted ``(name, value)`` pairs). Written ``method[:variant][@name=value...]``, e.g.
    ``keepkv:minnorm@selection=head@reference=ema``; the label is that text, so rows of configurations that
    differ only in an option never mix."""

    method: str
    variant: str = ""
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        text = self.method if not self.variant else f"{self.method}:{self.variant}"
        return text + "".join(f"{OPTION_SEPARATOR}{name}={value}" for name, value in self.options)

    @property
    def is_full(self) -> bool:
        return self.method == "full"

    def resolved_options(self) -> dict[str, Any]:
        """Every hyper-parameter of the method this configuration builds, defaults included, flattened
        (``selector.window`` for the selector of ``X+keepkv``); ``{}`` for the full cache. This, not the text the
        configuration was written with, is what identifies a configuration across library versions: a changed
        default makes a new configuration."""
        if self.is_full:
            return {}
        from keepkv.cache.methods import make_method

        return flatten_options(make_method(self.method, **self.method_options()).options())

    def row_fields(self) -> dict[str, Any]:
        """The keys a result row identifies its configuration by: ``method``, ``variant``, ``options`` (as
        written, when any) and ``resolved_options`` (:meth:`resolved_options`)."""
        fields: dict[str, Any] = {"method": self.method, "variant": self.variant,
                                  "resolved_options": self.resolved_options()}
        if self.options:
            fields["options"] = dict(self.options)
        return fields

    def method_options(self) -> dict[str, Any]:
        options = dict(self.options)
        if self.variant:
            options["variant"] = self.variant
        return options

    @classmethod
    def parse(cls, text: str) -> MethodConfig:
        """``"snapkv"``, ``"keepkv:minnorm"``, ``"snapkv+keepkv"`` (KeepKV's default variant),
        ``"criticalkv+keepkv:convex"``, ``"keepkv:minnorm@selection=head@max_evicted_weight=1.0"``. A variant written
        as an option (``"keepkv@variant=convex"``) is the same configuration as ``"keepkv:convex"``."""
        from keepkv.errors import KeepKVError

        head, *option_texts = text.strip().split(OPTION_SEPARATOR)
        options = []
        for option in option_texts:
            key, sep, value = option.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise KeepKVError(f"bad option {option!r} in {text!r}: the form is method@name=value")
            options.append((key.strip(), parse_option_value(value.strip())))
        if len({key for key, _ in options}) != len(options):
            raise KeepKVError(f"{text!r} names an option twice")
        name, _, variant = head.partition(":")
        name = name.lower()
        written = dict(options).get("variant")
        if written is not None:  # "keepkv@variant=convex" means "keepkv:convex"; one spelling per configuration
            if variant and variant != written:
                raise KeepKVError(f"{text!r} names two variants ({variant!r} and {written!r}); write one, "
                                  f"as method:variant")
            variant = str(written)
            options = [(key, value) for key, value in options if key != "variant"]
        from keepkv.ops.merge import MERGE_VARIANTS

        if variant and variant not in MERGE_VARIANTS:
            raise KeepKVError(f"unknown KeepKV variant {variant!r} in {text!r}; allowed: {', '.join(MERGE_VARIANTS)}")
        if "keepkv" in name and not variant:
            from keepkv.cache.methods.keepkv import KeepKV

            variant = KeepKV.variant  # the library's default variant, recorded explicitly in every row
        if variant and "keepkv" not in name:
            raise KeepKVError(f"{text!r}: only keepkv and X+keepkv take a variant")
        if name == "full" and options:
            raise KeepKVError(f"{text!r}: the full cache takes no options")
        return cls(name, variant, tuple(sorted(options)))


def flatten_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"window": 32, "selector": {"name": "snapkv", "window": 32}}`` ->
    ``{"window": 32, "selector.name": "snapkv", "selector.window": 32}``, keys sorted."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(flatten_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return dict(sorted(flat.items()))


def versions() -> dict[str, str]:
    import torch

    from keepkv import __version__

    return {"keepkv_version": __version__, "torch_version": torch.__version__}


def prompt_digest(*token_lists: Sequence[int]) -> str:
    """A short digest of a prompt's token ids (every part, in order): rows carry it so a resumable run can tell
    that the prompt behind a stored row is the one it would run (:meth:`ResultStore.done`)."""
    import hashlib

    return hashlib.sha1(json.dumps([list(map(int, ids)) for ids in token_lists]).encode()).hexdigest()[:16]


OPTIONS_ADDED_LATER: dict[str, dict[str, Any]] = {"keepkv": {"value_norm_power": 0.0, "recent_fraction": 0.0,
                                                               "value_weighting": "value", "layer_share": 0.5}}
"""Per method, the options added after results were stored, each with the value that behaves as the method did
before it existed: at that value it is left out of unit keys, so adding an option does not turn every stored unit
into work to redo (:func:`options_added_later`)."""


def options_added_later(method: str) -> dict[str, Any]:
    """The :data:`OPTIONS_ADDED_LATER` of the method that owns ``method``'s top-level options: ``X`` of
    ``adakv-X``, the merger of ``X+keepkv`` (the selector's options are nested under ``selector``)."""
    return OPTIONS_ADDED_LATER.get(method.split("+")[-1].removeprefix("adakv-"), {})


SELECTION_ONLY_OPTIONS = ("selection", "score_normalization", "last_query_weight", "agnostic_last_query_weight",
                          "kernel_size", "value_norm_power", "layer_budgets", "cosine_decay", "pyramid_beta",
                          "recent_fraction", "value_weighting", "layer_share")
"""KeepKV's options that only its own selection reads (its scores and its layer budgets): in a composition
``X+keepkv`` the selector ``X`` chooses and budgets (``keepkv.cache.compose.Selected``), so they change nothing."""


def unit_key(task: str, model: str, config: MethodConfig, budget: float | int, group: str) -> str:
    """The identity of one unit of work (a resumable step): every hyper-parameter of the configuration, defaults
    included (:meth:`MethodConfig.resolved_options`), is part of it, so a run after a default changed redoes the
    work instead of skipping it as done; an option of :func:`options_added_later` is not when it is at its
    earlier behaviour, nor, in a composition ``X+keepkv``, when it is one of KeepKV's selection options (never
    read there: :data:`SELECTION_ONLY_OPTIONS`). Integral option values are written as integers, the form
    :func:`canonical_unit` reads stored keys in."""
    key: list[Any] = [task, model, config.method, config.variant, budget, group]
    unread = set(SELECTION_ONLY_OPTIONS) if config.method.endswith("+keepkv") else set()
    later = options_added_later(config.method)
    resolved = {name: value for name, value in config.resolved_options().items()
                if name not in later or (value != later[name] and name not in unread)}
    if resolved:
        key.append([[name, _integral_as_int(value)] for name, value in sorted(resolved.items())])
    return json.dumps(key)


def _integral_as_int(value: Any) -> Any:
    """An integral float as an int (``1.0`` -> ``1``); anything else (bools included) unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def canonical_unit(unit: str) -> str:
    """``unit`` with every integral float among its option values written as an integer, so one configuration
    names one unit whatever number type its options were stored in. Methods store each option in its field's type
    (``keepkv.cache.policy.CompressionMethod.__post_init__``), but keys stored before that hold ``1`` where
    today's hold ``1.0``: stored keys are read through this too. Only the option pairs change: the budget keeps
    its type (``1`` token and the fraction ``1.0`` differ)."""
    try:
        key = json.loads(unit)
    except json.JSONDecodeError:
        return unit
    if not isinstance(key, list) or len(key) < 7 or not isinstance(key[6], list):
        return unit
    key[6] = [[name, _integral_as_int(value)] for name, value in key[6]]
    return json.dumps(key)


def validate_row(row: dict[str, Any]) -> dict[str, Any]:
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(f"result row lacks {', '.join(missing)}: {row}")
    return row


def read_rows(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Every row of every ``*.jsonl`` file below ``directory`` (recursively), skipping blank / broken lines
    (an interrupted write) and lines lacking the required keys."""
    for path in sorted(Path(directory).rglob("*.jsonl")):
        if path.name.startswith("prompts"):
            continue
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and all(key in row for key in REQUIRED_KEYS):
                    yield row


class ResultStore:
    """Appends rows to ``<directory>/<task>.jsonl``; remembers finished units (``unit`` key of the rows)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cells: dict[str, dict[str, str | None]] = {}  # unit -> cell -> prompt digest of its row (or None)
        for path in self.directory.glob("*.jsonl"):
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict) and "unit" in row:
                        self._remember(row)
        self._versions = versions()

    def _remember(self, row: dict[str, Any]) -> None:
        cells = self._cells.setdefault(canonical_unit(row["unit"]), {})
        if "cell" in row:
            cells[str(row["cell"])] = row.get("prompt_digest")

    def done(self, unit: str, cells: Mapping[str, str] | None = None) -> bool:
        """Whether ``unit`` is finished. With ``cells`` (cell name -> :func:`prompt_digest` of the prompt it would
        run), only if every one of them has a row in the unit written from that same prompt: a unit with rows
        removed, or whose prompts changed since (a new task generator, another tokenizer), is redone and its new
        rows supersede the old (readers keep the latest row per cell). Rows older than the digest are taken as
        matching."""
        stored = self._cells.get(canonical_unit(unit))
        if stored is None:
            return False
        if cells is None:
            return True
        return all(name in stored and stored[name] in (None, digest) for name, digest in cells.items())

    def write(self, task: str, unit: str, rows: Iterable[dict[str, Any]]) -> None:
        """Append the rows of one unit at once (each gets ``unit``, ``engine``, versions) and mark it done."""
        full = [validate_row({**row, "task": task, "engine": "keepkv", **self._versions, "unit": unit})
                for row in rows]
        with (self.directory / f"{task}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write("\n".join(json.dumps(row, sort_keys=False) for row in full) + "\n")
            handle.flush()
        for row in full:
            self._remember(row)
