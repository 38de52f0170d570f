"""The grids of ``keepkv eval all``: ``quick`` (CI / smoke), ``full`` (the README results; wall times in
``results/eval/walltime.log``), ``quality`` and ``headline``.

``headline`` (issue 13): the RULER-style tasks (:mod:`keepkv.eval.tasks`, all 7 families at 2048 tokens, both
protocols) for SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B, ``HEADLINE_CONFIGS`` at 10/20/50%. Batches mix one
sample of every family (7 rows), so each configuration runs once per batch: per model, 2 protocols x (7 S
prefills + S x 22 configuration-budget runs) for S samples per family (2 / 1 / 1). The runs are greedy decodes
whose time is reading the weights (one read per step serves the whole batch), the prefills are compute-bound.
Measured wall times and what would make more samples affordable: ``results/tasks/RUN.md``.

Sizing of the full grid (measured costs in ``results/eval/RUN.md``): every configuration at every budget shares
one full prefill per cell group, so the cost is ~(prefills) + (configurations x budgets x short decodes) for NIAH /
QA / fidelity, and ~(configurations x budgets x document) chunked forwards for perplexity. Qwen2.5-Coder-0.5B costs
~4x SmolLM2 per token, so it gets fewer / shorter cells (the minimums of the issue are kept: 3 depths x 2 lengths
up to 8k for NIAH, every method at every budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keepkv.eval.results import MethodConfig

SMOLLM2 = "SmolLM2-135M-Instruct"
QWEN = "Qwen2.5-Coder-0.5B-Instruct"
QWEN_15 = "Qwen2.5-Coder-1.5B-Instruct"

ALL_CONFIGS = [
    "full", "streamingllm", "h2o", "snapkv", "tova", "pyramidkv", "criticalkv", "weightedkv", "cam", "d2o",
    "keepkv:zip", "keepkv:convex", "keepkv:keep-key", "keepkv:minnorm",
    "snapkv+keepkv:zip", "criticalkv+keepkv:zip", "snapkv+keepkv:minnorm", "criticalkv+keepkv:minnorm",
    "adakv-snapkv",
]
BUDGETS = [0.05, 0.1, 0.2, 0.5]

_ATTENTION_ONLY = "@value_norm_power=0"  # the study ran before scores were weighted by value norms
_KEEPKV_OLD = ("keepkv:minnorm@selection=head@score_normalization=total@kernel_size=1@max_evicted_weight=1.0"
               f"@reference=ema{_ATTENTION_ONLY}")
_KEEPKV_LAYER = f"keepkv:minnorm@selection=layer@kernel_size=1{_ATTENTION_ONLY}"
_KEEPKV_POOLED = f"keepkv:minnorm@selection=layer@kernel_size=7{_ATTENTION_ONLY}"
_EMA = "@reference=ema"  # the merge reference of the study's rows unless they name reference=last
QUALITY_CONFIGS = [
    "full", "snapkv", "tova", "h2o",
    _KEEPKV_OLD, f"{_KEEPKV_OLD}@similarity_threshold=1.0",
    f"{_KEEPKV_LAYER}{_EMA}", f"{_KEEPKV_LAYER}{_EMA}@similarity_threshold=1.0",
    f"{_KEEPKV_LAYER}{_EMA}@score_normalization=per-token",
    f"{_KEEPKV_LAYER}{_EMA}@score_normalization=per-token@max_evicted_weight=0.5",
    f"{_KEEPKV_LAYER}@score_normalization=per-token@max_evicted_weight=0.5@reference=last",
    f"{_KEEPKV_LAYER}@reference=last",
    f"{_KEEPKV_POOLED}{_EMA}", f"{_KEEPKV_POOLED}{_EMA}@similarity_threshold=1.0",
    f"{_KEEPKV_POOLED}{_EMA}@score_normalization=per-token", f"{_KEEPKV_POOLED}{_EMA}@max_evicted_weight=0.5",
    f"{_KEEPKV_POOLED}@reference=last", f"{_KEEPKV_POOLED}@reference=last@max_evicted_weight=0.5",
    f"keepkv:keep-key@selection=layer@kernel_size=7{_EMA}{_ATTENTION_ONLY}",
    f"keepkv:convex@selection=layer@kernel_size=7{_EMA}{_ATTENTION_ONLY}",
    f"{_KEEPKV_POOLED}@reference=last@window=8",
]
"""The option study behind KeepKV's defaults (``docs/keepkv-quality.md``): the earlier default (every option
written out), each new option added one at a time, and each configuration again without merging
(``similarity_threshold=1.0``: its own base selector), beside the eviction methods it must beat. Every
configuration names the selection, pooling, merge reference and value weighting it ran with, so the grid
reproduces the stored rows (``results/quality``) whatever today's defaults are."""


HEADLINE_CONFIGS = [
    "full", "keepkv", "keepkv@similarity_threshold=1.0", "snapkv", "tova", "streamingllm", "h2o", "criticalkv",
]
"""The headline comparison (issue 13): KeepKV with today's defaults, the same configuration without merging (a
similarity threshold no cosine exceeds: its own base selector), and the eviction methods it must beat."""


@dataclass
class ModelGrid:
    """What one model runs. Sizes in tokens."""

    model: str
    configs: list[str] = field(default_factory=lambda: list(ALL_CONFIGS))
    budgets: list[float] = field(default_factory=lambda: list(BUDGETS))
    fidelity_context: int = 2048
    fidelity_steps: int = 16
    fidelity_contexts: int = 1
    ppl_tokens: int = 2048
    ppl_documents: int = 1
    ppl_chunk: int = 64
    niah_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    niah_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    niah_samples: int = 1
    niah_protocols: tuple[str, ...] = ("agnostic",)
    qa_count: int = 8
    qa_context: int = 2048
    qa_batch: int = 4
    task_families: list[str] = field(default_factory=lambda: ["niah_single", "multikey", "multivalue", "multiquery",
                                                              "vt", "qa_squad", "qa_hotpot"])
    task_lengths: list[int] = field(default_factory=lambda: [2048])
    task_samples: int = 4
    task_protocols: tuple[str, ...] = ("aware", "agnostic")
    task_batch: int = 4
    tasks: tuple[str, ...] = ("fidelity", "niah", "ppl", "qa")

    def method_configs(self) -> list[MethodConfig]:
        return [MethodConfig.parse(c) for c in self.configs]


GRIDS: dict[str, list[ModelGrid]] = {
    "quality": [
        ModelGrid(SMOLLM2, configs=QUALITY_CONFIGS, budgets=[0.1, 0.2, 0.5], fidelity_context=1024,
                  fidelity_contexts=8, niah_lengths=[1024], niah_depths=[0.1, 0.3, 0.5, 0.7, 0.9], niah_samples=4,
                  niah_protocols=("aware", "agnostic"), tasks=("fidelity", "niah")),
    ],
    "quick": [
        ModelGrid(SMOLLM2, configs=["full", "keepkv:minnorm"], budgets=[0.25], fidelity_context=256, fidelity_steps=4,
                  ppl_tokens=256, niah_lengths=[384], niah_depths=[0.5], qa_count=1, qa_context=384, qa_batch=1,
                  task_families=["multikey"], task_lengths=[512], task_samples=1,
                  tasks=("fidelity", "niah", "ppl", "qa", "tasks")),
    ],
    "headline": [
        ModelGrid(model, configs=HEADLINE_CONFIGS, budgets=[0.1, 0.2, 0.5], task_lengths=[2048], task_samples=samples,
                  task_batch=7, tasks=("tasks",))
        for model, samples in ((SMOLLM2, 2), (QWEN, 1), (QWEN_15, 1))
    ],
    "full": [
        ModelGrid(SMOLLM2, ppl_tokens=1024, qa_count=4, qa_context=1024, qa_batch=4),
        ModelGrid(QWEN, fidelity_context=1024, fidelity_steps=16, ppl_tokens=1024, niah_lengths=[2048, 8192],
                  qa_count=4, qa_context=1024, qa_batch=4),
    ],
}


def grid(name: str) -> list[ModelGrid]:
    from keepkv.errors import KeepKVError

    if name not in GRIDS:
        raise KeepKVError(f"unknown grid {name!r}; allowed: {', '.join(GRIDS)}")
    return GRIDS[name]
