"""Metrics, result store and report of ``keepkv.eval`` on hand-checkable cases (no model)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from keepkv.eval import metrics
from keepkv.eval.results import MethodConfig, ResultStore, read_rows, unit_key


def test_kl_of_identical_distributions_is_zero_and_known_value():
    logits = torch.randn(3, 7, 50)
    assert torch.allclose(metrics.kl_divergence(logits, logits), torch.zeros(3, 7), atol=1e-6)
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 0.75]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(metrics.kl_divergence(p, q)) == pytest.approx(expected, abs=1e-6)
    assert float(metrics.kl_divergence(q, p)) != pytest.approx(expected, abs=1e-3)  # not symmetric


def test_top1_and_relative_l2():
    a = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 5.0, 1.0], [0.0, 3.0, 1.0]])
    assert metrics.top1_agreement(a, b).tolist() == [1.0, 0.0]
    reference = torch.tensor([[3.0, 4.0]])
    assert float(metrics.relative_l2(reference, reference)) == 0.0
    assert float(metrics.relative_l2(reference, torch.tensor([[3.0, 9.0]]))) == pytest.approx(1.0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    vocab = 50
    logits = torch.zeros(1, 20, vocab)
    targets = torch.randint(0, vocab, (1, 20))
    assert metrics.perplexity(logits, targets) == pytest.approx(vocab, rel=1e-5)
    sure = torch.full((1, 4, vocab), -1e4)
    targets = torch.tensor([[1, 2, 3, 4]])
    sure[0, torch.arange(4), targets[0]] = 0.0
    assert metrics.perplexity(sure, targets) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("answer,found", [
    ("The special magic number is 7342819.", True), ("7342819", True), ("It is 7,342,819!", True),
    ("17342819", False), ("73428190", False), ("734281", False), ("I don't know.", False),
])
def test_needle_exact_match(answer, found):
    assert metrics.needle_found(answer, "7342819") is found


def test_squad_f1_and_exact_match_on_known_strings():
    assert metrics.squad_exact_match("The Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert metrics.squad_f1("the Eiffel Tower", ["Eiffel Tower"]) == 1.0
    assert metrics.squad_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert metrics.squad_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert metrics.squad_f1("Paris France", ["London", "in Paris"]) == pytest.approx(0.5)  # max over answers
    assert metrics.squad_f1("nothing here", ["Eiffel Tower"]) == 0.0
    assert metrics.first_answer_line("  Paris\n\nBecause ...") == "Paris"


def test_method_config_parsing():
    assert MethodConfig.parse("keepkv").label == "keepkv:minnorm"  # the library default, written explicitly
    assert MethodConfig.parse("snapkv+keepkv").label == "snapkv+keepkv:minnorm"
    assert MethodConfig.parse("snapkv+keepkv:minnorm").method_options() == {"variant": "minnorm"}
    assert MethodConfig.parse("snapkv").label == "snapkv"
    from keepkv.errors import KeepKVError

    with pytest.raises(KeepKVError, match="variant"):
        MethodConfig.parse("snapkv:zip")
    with pytest.raises(KeepKVError, match="allowed"):
        MethodConfig.parse("keepkv:best")


def test_a_variant_written_as_an_option_is_the_variant():
    """``keepkv@variant=convex`` once ran the default variant under a label naming convex: it is ``keepkv:convex``."""
    from keepkv.errors import KeepKVError

    as_option = MethodConfig.parse("keepkv@variant=convex@reference=last")
    assert as_option == MethodConfig.parse("keepkv:convex@reference=last")
    assert as_option.method_options() == {"variant": "convex", "reference": "last"}
    assert as_option.resolved_options()["variant"] == "convex"
    assert MethodConfig.parse("snapkv+keepkv@variant=zip").label == "snapkv+keepkv:zip"
    with pytest.raises(KeepKVError, match="two variants"):
        MethodConfig.parse("keepkv:zip@variant=convex")
    with pytest.raises(KeepKVError, match="allowed"):
        MethodConfig.parse("keepkv@variant=best")
    with pytest.raises(KeepKVError, match="only keepkv"):
        MethodConfig.parse("snapkv@variant=zip")


def test_method_config_options_are_part_of_its_identity():
    """Configurations that differ only in an option get different labels, row fields and resumable unit keys
    (the store would otherwise skip the second one as done)."""
    plain = MethodConfig.parse("keepkv:minnorm")
    layer = MethodConfig.parse("keepkv:minnorm@selection=layer@max_evicted_weight=0.5")
    assert layer.options == (("max_evicted_weight", 0.5), ("selection", "layer"))
    assert layer.method_options() == {"selection": "layer", "max_evicted_weight": 0.5, "variant": "minnorm"}
    assert layer.label == "keepkv:minnorm@max_evicted_weight=0.5@selection=layer"
    assert MethodConfig.parse(layer.label) == layer
    assert layer.row_fields()["options"] == {"selection": "layer", "max_evicted_weight": 0.5}
    assert "options" not in plain.row_fields()
    assert unit_key("niah", "M", plain, 0.1, "ctx1024") != unit_key("niah", "M", layer, 0.1, "ctx1024")
    from keepkv.errors import KeepKVError

    for bad in ("keepkv@selection", "keepkv@=3", "keepkv@window=4@window=5", "full@window=4"):
        with pytest.raises(KeepKVError):
            MethodConfig.parse(bad)


def test_report_labels_carry_the_options():
    from keepkv.eval.report import label

    row = _row(method="keepkv", variant="minnorm", options={"selection": "layer"})
    assert label(row) == "keepkv:minnorm@selection=layer"
    assert label(_row(method="keepkv", variant="minnorm")) == "keepkv:minnorm"


def test_labels_from_resolved_options_name_what_differs_from_todays_defaults():
    """A row records every hyper-parameter; its label lists only those that differ from the current defaults, so
    rows of an older default never pass for today's ``keepkv:minnorm``, and unit keys follow the same rule."""
    from keepkv.eval.report import label

    default = MethodConfig.parse("keepkv:minnorm")
    resolved = default.row_fields()["resolved_options"]
    assert resolved["similarity_threshold"] == 0.8 and "selection" in resolved
    assert label(_row(method="keepkv", variant="minnorm", resolved_options=resolved)) == "keepkv:minnorm"
    other = "head" if resolved["selection"] == "layer" else "layer"
    older = {**resolved, "selection": other}
    assert label(_row(method="keepkv", variant="minnorm", resolved_options=older)) == f"keepkv:minnorm@selection={other}"
    written = MethodConfig.parse(f"keepkv:minnorm@selection={resolved['selection']}")  # the default, written out
    assert unit_key("niah", "M", written, 0.1, "g") == unit_key("niah", "M", default, 0.1, "g")
    assert MethodConfig.parse("snapkv+keepkv").resolved_options()["selector.name"] == "snapkv"


def test_an_option_added_later_at_its_earlier_behaviour_keeps_stored_units_done():
    """``value_norm_power=0`` is KeepKV before the option existed: its unit key is the one stored rows were
    written under (no ``value_norm_power`` in it), any other value is a new unit."""
    before = unit_key("tasks", "M", MethodConfig.parse("keepkv:minnorm@value_norm_power=0.0"), 0.2, "g")
    assert "value_norm_power" not in before
    weighted = unit_key("tasks", "M", MethodConfig.parse("keepkv:minnorm@value_norm_power=1"), 0.2, "g")
    assert weighted != before and ["value_norm_power", 1] in json.loads(weighted)[-1]


def test_an_integral_option_value_names_one_unit_however_written(tmp_path):
    """``@value_norm_power=1`` and a default of ``1.0`` are one configuration: their unit keys agree, and a unit
    stored under the float spelling is done for the integer one (keys read back are canonicalised too); the
    budget keeps its type, so one token and the whole prompt stay two units."""
    from keepkv.eval.results import canonical_unit

    as_int = unit_key("tasks", "M", MethodConfig.parse("keepkv:minnorm@value_norm_power=1"), 0.2, "g")
    as_float = unit_key("tasks", "M", MethodConfig.parse("keepkv:minnorm@value_norm_power=1.0"), 0.2, "g")
    assert as_int == as_float
    one_token, whole = (unit_key("tasks", "M", MethodConfig("snapkv"), budget, "g") for budget in (1, 1.0))
    assert one_token != whole
    key = json.loads(as_int)
    key[6] = [[name, float(value) if name == "value_norm_power" else value] for name, value in key[6]]
    stored_as_float = json.dumps(key)
    assert stored_as_float != as_int and canonical_unit(stored_as_float) == as_int
    ResultStore(tmp_path).write("tasks", stored_as_float, [_row(cell="x")])
    assert ResultStore(tmp_path).done(as_int, {"x": None})
    assert canonical_unit("not json") == "not json"


def test_a_composition_unit_ignores_keepkvs_selection_options_added_later():
    """In ``X+keepkv`` the selector ranks, so KeepKV's value weighting is never read: a composition's unit key
    does not carry it at any value, and units stored before the option existed stay done."""
    plain = unit_key("tasks", "M", MethodConfig.parse("snapkv+keepkv:minnorm"), 0.2, "g")
    assert "value_norm_power" not in plain
    for value in ("0", "1", "0.5"):
        written = MethodConfig.parse(f"snapkv+keepkv:minnorm@value_norm_power={value}")
        assert unit_key("tasks", "M", written, 0.2, "g") == plain
    assert "value_norm_power" in unit_key("tasks", "M", MethodConfig.parse("keepkv:minnorm"), 0.2, "g")


def test_a_row_written_before_an_option_existed_is_labelled_with_its_earlier_behaviour(monkeypatch):
    """A stored row without an option of ``OPTIONS_ADDED_LATER`` ran at that option's earlier behaviour; its
    label says so whenever today's default differs (here the earlier value is patched to differ), and never
    passes for the default."""
    from keepkv.eval import report, results

    resolved = MethodConfig.parse("keepkv:minnorm").row_fields()["resolved_options"]
    before = {k: v for k, v in resolved.items() if k != "value_norm_power"}
    row = _row(method="keepkv", variant="minnorm", resolved_options=before)
    earlier = results.OPTIONS_ADDED_LATER["keepkv"]["value_norm_power"]
    assert earlier != resolved["value_norm_power"]  # today's default weighs by value norms
    assert report.label(row) == f"keepkv:minnorm@value_norm_power={earlier}"
    written_as_int = _row(method="keepkv", variant="minnorm", resolved_options={**before, "value_norm_power": 0})
    assert report.label(written_as_int) == report.label(row)  # one label for 0 and 0.0 of a float option
    monkeypatch.setitem(results.OPTIONS_ADDED_LATER["keepkv"], "value_norm_power", resolved["value_norm_power"])
    assert report.label(row) == "keepkv:minnorm"
    monkeypatch.setitem(results.OPTIONS_ADDED_LATER["keepkv"], "value_norm_power", 2.5)
    assert report.label(row) == "keepkv:minnorm@value_norm_power=2.5"
    snapkv = MethodConfig("snapkv").row_fields()["resolved_options"]
    assert report.label(_row(method="snapkv", resolved_options=snapkv)) == "snapkv"  # not an option of SnapKV


def test_an_option_added_later_belongs_to_its_method():
    """KeepKV's ``recent_fraction`` (added later, earlier behaviour 0) leaves KeepKV's unit keys and labels alone at
    0 and names itself otherwise; H2O's own ``recent_fraction`` (there from the start, default 0.5) stays in H2O's
    keys at every value, 0 included."""
    from keepkv.eval import report

    plain = unit_key("tasks", "M", MethodConfig.parse("keepkv"), 0.2, "g")
    assert unit_key("tasks", "M", MethodConfig.parse("keepkv@recent_fraction=0"), 0.2, "g") == plain
    assert unit_key("tasks", "M", MethodConfig.parse("keepkv@recent_fraction=0.5"), 0.2, "g") != plain
    composed = unit_key("tasks", "M", MethodConfig.parse("snapkv+keepkv"), 0.2, "g")
    assert unit_key("tasks", "M", MethodConfig.parse("snapkv+keepkv@recent_fraction=0.5"), 0.2, "g") == composed
    h2o_keys = {unit_key("tasks", "M", MethodConfig.parse(f"h2o@recent_fraction={v}"), 0.2, "g") for v in (0, 0.5)}
    assert len(h2o_keys) == 2 and all("recent_fraction" in key for key in h2o_keys)
    resolved = MethodConfig.parse("keepkv").row_fields()["resolved_options"]
    stored = _row(method="keepkv", variant="minnorm",
                  resolved_options={k: v for k, v in resolved.items() if k != "recent_fraction"})
    assert report.label(stored) == "keepkv:minnorm"
    recent = MethodConfig.parse("keepkv@recent_fraction=0.5").row_fields()["resolved_options"]
    assert report.label(_row(method="keepkv", variant="minnorm", resolved_options=recent)) == \
        "keepkv:minnorm@recent_fraction=0.5"
    h2o = MethodConfig.parse("h2o@recent_fraction=0").row_fields()["resolved_options"]
    assert report.label(_row(method="h2o", resolved_options=h2o)) == "h2o@recent_fraction=0.0"


def test_keepkvs_value_weighting_added_later_keys_and_labels_only_when_not_the_value_norm():
    """``value_weighting`` (added later, earlier behaviour ``"value"``): stored KeepKV rows without it keep their
    unit keys and their label; ``"output"`` is a unit of its own and names itself."""
    from keepkv.eval import report

    plain = unit_key("tasks", "M", MethodConfig.parse("keepkv"), 0.2, "g")
    assert unit_key("tasks", "M", MethodConfig.parse("keepkv@value_weighting=value"), 0.2, "g") == plain
    output = MethodConfig.parse("keepkv@value_weighting=output")
    assert unit_key("tasks", "M", output, 0.2, "g") != plain
    resolved = MethodConfig.parse("keepkv").row_fields()["resolved_options"]
    stored = _row(method="keepkv", variant="minnorm",
                  resolved_options={k: v for k, v in resolved.items() if k != "value_weighting"})
    assert report.label(stored) == "keepkv:minnorm"
    assert report.label(_row(method="keepkv", variant="minnorm", resolved_options=output.row_fields()[
        "resolved_options"])) == "keepkv:minnorm@value_weighting=output"


def test_keepkvs_layer_share_added_later_keys_and_labels_only_away_from_its_default():
    """``layer_share`` (added later with ``selection="blend"``, default 0.5): stored KeepKV rows without it keep
    their unit keys and labels; ``selection=blend`` names itself, and another share is a unit of its own."""
    from keepkv.eval import report

    plain = unit_key("tasks", "M", MethodConfig.parse("keepkv"), 0.2, "g")
    assert "layer_share" not in plain  # the key a row stored before the option existed has
    resolved = MethodConfig.parse("keepkv").row_fields()["resolved_options"]
    stored = _row(method="keepkv", variant="minnorm",
                  resolved_options={k: v for k, v in resolved.items() if k != "layer_share"})
    assert report.label(stored) == "keepkv:minnorm"
    blend = MethodConfig.parse("keepkv@selection=blend")
    other = MethodConfig.parse("keepkv@selection=blend@layer_share=0.8")
    keys = {unit_key("tasks", "M", config, 0.2, "g") for config in (blend, other)}
    assert len(keys | {plain}) == 3
    assert "layer_share" not in unit_key("tasks", "M", blend, 0.2, "g")  # at its default, as added later
    assert report.label(_row(method="keepkv", variant="minnorm", resolved_options=blend.row_fields()[
        "resolved_options"])) == "keepkv:minnorm@selection=blend"
    assert report.label(_row(method="keepkv", variant="minnorm", resolved_options=other.row_fields()[
        "resolved_options"])) == "keepkv:minnorm@layer_share=0.8@selection=blend"


def test_a_configuration_that_merges_nothing_is_labelled_without_the_merge_options():
    """Without merging (``similarity_threshold=1.0``) the merge reference, its EMA decay and the dominance guard
    are never read, so a run under the EMA reference and one under today's reference share one label (the
    "merging never hurts" target finds its base selector); a merging configuration keeps them in its label."""
    from keepkv.eval.report import label

    resolved = MethodConfig.parse("keepkv:minnorm@similarity_threshold=1.0").row_fields()["resolved_options"]
    other = "ema" if resolved["reference"] == "last" else "last"
    for method in ("keepkv", "snapkv+keepkv"):
        older = {**resolved, "reference": other, "max_evicted_weight": 0.5}
        row = _row(method=method, variant="minnorm", resolved_options=older)
        assert label(row) == f"{method}:minnorm@similarity_threshold=1.0"
        merging = _row(method=method, variant="minnorm", resolved_options={**older, "similarity_threshold": 0.8})
        assert label(merging) == f"{method}:minnorm@max_evicted_weight=0.5@reference={other}"
    evicting = _row(method="snapkv", resolved_options={"kernel_size": 7, "reference": "x"})
    assert "reference=x" in label(evicting)  # only KeepKV's own options are normalised


def test_a_composition_is_labelled_without_keepkvs_selection_options():
    """In ``X+keepkv`` the selector chooses the entries and the layer budgets, so KeepKV's own selection options
    (pooling, head sharing, score weights, budget schedule) are never read: rows run under other KeepKV selection
    defaults share one label. KeepKV alone keeps them, and every option still names its own field."""
    from keepkv.cache.methods.keepkv import KeepKV
    from keepkv.eval.report import MERGE_ONLY_OPTIONS, SELECTION_ONLY_OPTIONS, label

    fields = {f.name for f in dataclasses.fields(KeepKV)}
    assert set(SELECTION_ONLY_OPTIONS) <= fields and set(MERGE_ONLY_OPTIONS) <= fields
    resolved = MethodConfig.parse("snapkv+keepkv").row_fields()["resolved_options"]
    older = {**resolved, "kernel_size": resolved["kernel_size"] + 2, "selection": "head", "layer_budgets": "pyramid"}
    assert label(_row(method="snapkv+keepkv", variant="minnorm", resolved_options=older)) == "snapkv+keepkv:minnorm"
    selector_changed = {**older, "selector.kernel_size": 3}
    assert label(_row(method="snapkv+keepkv", variant="minnorm", resolved_options=selector_changed)) == \
        "snapkv+keepkv:minnorm@selector.kernel_size=3"
    alone = {**MethodConfig.parse("keepkv").row_fields()["resolved_options"], "selection": "head"}
    assert label(_row(method="keepkv", variant="minnorm", resolved_options=alone)) == "keepkv:minnorm@selection=head"


def test_rows_from_before_the_agnostic_option_show_what_they_ran():
    """KeepKV rows written before ``agnostic_last_query_weight`` existed ranked query-agnostic cells with their
    ``last_query_weight``: those cells' label says so (never today's default); their query-aware cells, and
    fidelity, ran what today's default runs and keep its label."""
    from keepkv.eval.report import label

    resolved = MethodConfig.parse("keepkv:minnorm").row_fields()["resolved_options"]
    older = {k: v for k, v in resolved.items() if k != "agnostic_last_query_weight"}
    def row(**fields):
        return _row(method="keepkv", variant="minnorm", resolved_options=older, **fields)
    assert label(row(task="tasks", protocol="agnostic")) == "keepkv:minnorm@agnostic_last_query_weight=0.0"
    assert label(row(task="niah", metric="niah_exact_match")) == "keepkv:minnorm@agnostic_last_query_weight=0.0"
    assert label(row(task="tasks", protocol="aware")) == "keepkv:minnorm"
    assert label(row(task="niah", metric="niah_exact_match_aware")) == "keepkv:minnorm"
    assert label(row(task="fidelity", metric="kl")) == "keepkv:minnorm"
    assert label(_row(method="keepkv", variant="minnorm", resolved_options=resolved, task="tasks",
                      protocol="agnostic")) == "keepkv:minnorm"


def test_needle_digit_recall():
    assert metrics.needle_digit_recall(" 7342819.", "7342819") == 1.0
    assert metrics.needle_digit_recall("It is 7,342,819", "7342819") == 1.0
    assert metrics.needle_digit_recall(" 7764558.", "7342819") == pytest.approx(3 / 7)  # 7, 4, 8 in order
    assert metrics.needle_digit_recall(" 734.", "7342819") == pytest.approx(3 / 7)
    assert metrics.needle_digit_recall("no number", "7342819") == 0.0


def test_protocols_split_the_prompt_at_the_right_place():
    """agnostic: context compressed, question fed after; aware: everything but the last token compressed."""
    from keepkv.eval.data import PromptCell
    from keepkv.eval.prompted import compressed_part, fed_part

    cell = PromptCell("niah", "c", "ctx", "q?", ["1"], [1, 2, 3], [4, 5, 6], 8)
    assert (compressed_part(cell, "agnostic"), fed_part(cell, "agnostic")) == ([1, 2, 3], [4, 5, 6])
    assert (compressed_part(cell, "aware"), fed_part(cell, "aware")) == ([1, 2, 3, 4, 5], [6])


def _row(method="snapkv", variant="", budget=0.1, metric="niah_exact_match", value=1.0, cell="ctx512/depth50", **extra):
    return {"metric": metric, "value": value, "model": "M", "method": method, "variant": variant, "budget": budget,
            "kept_entries_per_head": 51.0, "cell": cell, "seed": 0, **extra}


def test_store_redoes_a_unit_with_a_missing_cell_or_a_changed_prompt(tmp_path):
    """A unit is done only when every cell it would run has a row written from the same prompt tokens; rows
    written before the digest existed count as matching."""
    from keepkv.eval.results import prompt_digest

    store = ResultStore(tmp_path)
    unit = unit_key("tasks", "M", MethodConfig("snapkv"), 0.1, "g")
    a, b = prompt_digest([1, 2], [3]), prompt_digest([1, 2], [4])
    assert a != b and a == prompt_digest([1, 2], [3]) and a != prompt_digest([1], [2, 3])
    store.write("tasks", unit, [_row(cell="x", prompt_digest=a), _row(cell="y", prompt_digest=b)])
    reopened = ResultStore(tmp_path)
    assert reopened.done(unit) and reopened.done(unit, {"x": a, "y": b})
    assert not reopened.done(unit, {"x": a, "y": b, "z": a})  # a cell without a row (rows removed, a new sample)
    assert not reopened.done(unit, {"x": b, "y": b})  # the prompt behind x changed since its row was written
    legacy = unit_key("tasks", "M", MethodConfig("tova"), 0.1, "g")
    store.write("tasks", legacy, [_row(cell="x")])
    assert ResultStore(tmp_path).done(legacy, {"x": a}) and not ResultStore(tmp_path).done(legacy, {"x": a, "y": b})


def test_store_is_resumable_and_reads_peer_rows(tmp_path):
    store = ResultStore(tmp_path)
    unit = unit_key("niah", "M", MethodConfig("snapkv"), 0.1, "ctx512")
    assert not store.done(unit)
    store.write("niah", unit, [_row()])
    assert ResultStore(tmp_path).done(unit)  # a new run sees the finished unit
    (tmp_path / "peers").mkdir()
    peer = {**_row(), "task": "niah", "engine": "kvpress", "keepkv_version": "0.1.0", "torch_version": "x"}
    (tmp_path / "peers" / "kvpress.jsonl").write_text(json.dumps(peer) + "\n{broken\n")
    rows = list(read_rows(tmp_path))
    assert sorted(r["engine"] for r in rows) == ["keepkv", "kvpress"]
    with pytest.raises(ValueError, match="lacks"):
        store.write("niah", "u2", [{"metric": "x"}])


def test_report_table_ppl_ratio_heatmap_and_readme(tmp_path):
    pytest.importorskip("matplotlib")
    from keepkv.eval.report import write_report

    store = ResultStore(tmp_path)
    rows = [
        ("ppl", _row(method="full", budget=1.0, metric="ppl", value=10.0, cell="doc")),
        ("ppl", _row(method="keepkv", variant="zip", metric="ppl", value=12.0, cell="doc")),
        ("niah", _row(method="full", budget=1.0, depth=0.5, target_tokens=512)),
        ("niah", _row(method="keepkv", variant="zip", value=0.0, depth=0.5, target_tokens=512)),
        ("niah", _row(method="snapkv", value=1.0, depth=0.5, target_tokens=512)),
    ]
    for i, (task, row) in enumerate(rows):
        store.write(task, f"u{i}", [row])
    (tmp_path / "peers").mkdir()
    peer = {**_row(), "task": "niah", "engine": "kvpress", "keepkv_version": "0.1.0", "torch_version": "x",
            "depth": 0.5, "target_tokens": 512}
    (tmp_path / "peers" / "kvpress.jsonl").write_text(json.dumps(peer) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- eval:begin (keep) -->\nold\n<!-- eval:end -->\ntail\n")
    report = write_report(tmp_path, readme=readme).read_text()
    assert "| M | keepkv:zip | 0.1 | 51 |" in report and "1.200" in report  # ppl ratio 12 / 10
    assert "snapkv [kvpress]" in report
    assert "snapkv NIAH EM" not in report and "NIAH EM @10%: snapkv 1.000 vs best KeepKV keepkv:zip 0.000" in report
    png = tmp_path / "niah_M.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n<!-- eval:begin (keep) -->\n") and text.endswith(
        "<!-- eval:end -->\ntail\n")


def test_niah_rows_group_by_target_length_whatever_the_engine():
    from keepkv.eval.report import niah_length

    assert niah_length({"target_tokens": 4096, "cell": "ctx4096/depth10", "context_tokens": 4098}) == 4096
    assert niah_length({"target_tokens": None, "cell": "ctx1024/depth50", "context_tokens": 1026}) == 1024  # peers
    assert niah_length({"cell": "other", "context_tokens": 777}) == 777


def test_labels_tell_peer_and_full_rows_apart():
    from keepkv.eval.report import is_full, is_peer

    assert is_full("full") and is_full("full [kvpress]") and not is_full("fullkv") and not is_full("snapkv")
    assert is_peer("snapkv [kvpress]") and not is_peer("snapkv+keepkv:minnorm") and not is_peer("full")


def test_a_configuration_written_twice_runs_once_and_counts_once():
    from keepkv.eval.prompted import priority_plan
    from keepkv.eval.report import aggregate

    written_out = MethodConfig.parse("keepkv:minnorm@similarity_threshold=0.8")  # the default, written out
    plan = priority_plan([MethodConfig.parse("keepkv"), written_out], [0.1])
    assert len(plan) == 1
    rows = [_row(method="keepkv", variant="minnorm", cell="c0", value=1.0, task="niah", engine="keepkv"),
            _row(method="keepkv", variant="minnorm", cell="c0", value=1.0, task="niah", engine="keepkv"),
            _row(method="keepkv", variant="minnorm", cell="c1", value=0.0, task="niah", engine="keepkv")]
    entry = aggregate(rows)[("M", "keepkv:minnorm", 0.1, "niah_exact_match")]
    assert (entry["n"], entry["value"]) == (2, 0.5)


def test_a_missing_jargon_file_is_a_clear_error(monkeypatch, tmp_path):
    """Outside a checkout and without Debian's jargon-text the haystack is missing: say where it was looked for."""
    from keepkv.errors import KeepKVError
    from keepkv.eval import data

    monkeypatch.setattr(data, "JARGON_SYSTEM", tmp_path / "jargon.txt.gz")
    monkeypatch.setattr(data, "JARGON_SLICE", tmp_path / "jargon_ch4-6.txt")
    with pytest.raises(KeepKVError, match="jargon-text"):
        data.jargon_text()
