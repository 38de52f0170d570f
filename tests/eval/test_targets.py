"""Issue 13's verdict tables (keepkv/eval/targets.py) on synthetic task rows: paired on shared cells only,
stratified intervals, and verdicts that can fail."""

from __future__ import annotations

from keepkv.eval.targets import (
    cells_by_config,
    difference,
    full_share_rows,
    interval_rows,
    merging_rows,
    paired,
    ranking_rows,
    ratio,
)

MODEL = "Qwen2.5-Coder-1.5B-Instruct"


def rows_for(method: str, values: dict[str, list[float]], *, variant: str = "", options=None, budget=0.5,
             protocol="aware", engine="keepkv", start: int = 0) -> list[dict]:
    out = []
    for family, family_values in values.items():
        for i, value in enumerate(family_values, start=start):
            out.append({"task": "tasks", "metric": f"task_accuracy_{protocol}", "protocol": protocol,
                        "model": MODEL, "method": method, "variant": variant, "options": options or {},
                        "budget": budget, "cell": f"{family}/len2048/s{i}", "family": family, "value": value,
                        "kept_entries_per_head": 10, "engine": engine})
    return out


def keepkv(values, **kw):
    return rows_for("keepkv", values, variant="minnorm", **kw)


def unmerged(values, **kw):
    return rows_for("keepkv", values, variant="minnorm", options={"similarity_threshold": 1.0}, **kw)


def test_pairs_only_shared_cells_and_families():
    data = cells_by_config(keepkv({"a": [1, 0, 1, 1], "b": [1, 1]}) + rows_for("tova", {"a": [0, 0]}))
    pairs = paired(data[(MODEL, "aware", "keepkv:minnorm", 0.5)], data[(MODEL, "aware", "tova", 0.5)])
    assert pairs == {"a": [(1.0, 0.0), (0.0, 0.0)]}


def test_difference_is_mean_over_families_with_an_interval_around_it():
    pairs = {"a": [(1.0, 0.0)] * 10, "b": [(0.0, 0.0)] * 10 + [(0.0, 1.0)] * 10}
    value, low, high = difference(pairs)
    assert abs(value - (1.0 + -0.5) / 2) < 1e-12
    assert low < value < high and low > -0.5 and high < 0.75  # family a never varies; b's mean is resampled


def test_merging_that_hurts_a_family_fails_the_target():
    rows = keepkv({"a": [1] * 10, "b": [0] * 10}) + unmerged({"a": [1] * 10, "b": [1] * 10})
    (line,) = merging_rows(cells_by_config(rows))[2:]
    assert line.endswith("| **no** |") and "b -1.00" in line
    rows = keepkv({"a": [1] * 10, "b": [1] * 10}) + unmerged({"a": [1] * 5 + [0] * 5, "b": [1] * 10})
    (line,) = merging_rows(cells_by_config(rows))[2:]
    assert line.endswith("| yes |")


def test_x_plus_keepkv_is_compared_with_x():
    rows = rows_for("tova+keepkv", {"a": [0] * 6}, variant="minnorm") + rows_for("tova", {"a": [1] * 6})
    (line,) = merging_rows(cells_by_config(rows))[2:]
    assert "`tova+keepkv:minnorm` vs `tova`" in line and line.endswith("| **no** |")


def test_ranking_names_the_best_competitor_and_says_behind():
    rows = (keepkv({"a": [1] * 8 + [0] * 8}) + rows_for("snapkv", {"a": [1] * 16})
            + rows_for("tova", {"a": [1] * 8 + [0] * 8}) + rows_for("full", {"a": [1] * 16}, budget=1.0)
            + unmerged({"a": [1] * 16}))  # KeepKV configurations and the full cache are not competitors
    (line,) = ranking_rows(cells_by_config(rows))[2:]
    assert "`snapkv`" in line and line.endswith("| **behind** |")
    rows = keepkv({"a": [1] * 16}) + rows_for("tova", {"a": [1] * 16}) + rows_for("snapkv", {"a": [0] * 16})
    (line,) = ranking_rows(cells_by_config(rows))[2:]
    assert "`tova`" in line and line.endswith("| tied first |")


def test_ranking_within_the_interval_is_not_called_first():
    rows = keepkv({"a": [1] * 15 + [0]}) + rows_for("tova", {"a": [1] * 16})
    (line,) = ranking_rows(cells_by_config(rows))[2:]
    assert line.endswith("| behind within the interval |")


def test_ranking_includes_peer_engines_on_their_shared_samples():
    rows = keepkv({"a": [0] * 16, "b": [1] * 16}) + rows_for("tova", {"a": [1] * 16}, engine="kvpress")
    (line,) = ranking_rows(cells_by_config(rows))[2:]
    assert "`tova [kvpress]`" in line and "| a 16 |" in line and "-1.00" in line


def test_interval_widths_name_every_ranked_configuration_above_the_bound():
    """Two coin-flip families of 8 samples give an interval near +-0.25; 100 samples each bring it under +-0.10.
    Competitors that answered fewer families than KeepKV (side studies) are not ranked."""
    coin = [1, 0] * 4
    rows = (keepkv({"a": [1] * 8, "b": [0] * 8}) + rows_for("tova", {"a": coin, "b": coin})
            + rows_for("snapkv", {"a": [1] * 8, "b": [1] * 8}) + rows_for("h2o", {"a": coin})
            + rows_for("full", {"a": coin, "b": coin}, budget=1.0))
    (line,) = interval_rows(cells_by_config(rows))[2:]
    assert "| 3 (8) |" in line and "(`tova`)" in line and "`h2o`" not in line
    widest = float(line.split("| ")[5].split()[0])
    assert 0.2 < widest < 0.4 and line.rstrip("| ").endswith(f"`tova` {widest:.3f}")
    rows = keepkv({"a": [1] * 100, "b": [0] * 100}) + rows_for("tova", {"a": [1, 0] * 50, "b": [1, 0] * 50})
    (line,) = interval_rows(cells_by_config(rows))[2:]
    assert line.endswith("| none |") and float(line.split("| ")[5].split()[0]) <= 0.10


def test_full_share_is_a_ratio_of_paired_means():
    rows = keepkv({"a": [1] * 9 + [0], "b": [1] * 10}) + rows_for("full", {"a": [1] * 10, "b": [1] * 10}, budget=1.0)
    value, low, high = ratio(paired(*(cells_by_config(rows)[(MODEL, "aware", lab, b)]
                                      for lab, b in (("keepkv:minnorm", 0.5), ("full", 1.0)))))
    assert abs(value - 0.95) < 1e-12 and low < value <= high <= 1.0
    (line,) = full_share_rows(cells_by_config(rows))[2:]
    assert "| yes (the target) |" in line
    rows = keepkv({"a": [0] * 10}) + rows_for("full", {"a": [1] * 10}, budget=1.0)
    (line,) = full_share_rows(cells_by_config(rows))[2:]
    assert "**no** (the target)" in line


def test_verdicts_resting_on_a_family_of_few_samples_are_undecided():
    """A family under MIN_SAMPLES paired samples has no usable interval (n = 1: a zero-width one): the verdict is
    'undecided' with its point estimate, in all three tables; a hurt family with enough samples still fails."""
    from keepkv.eval.targets import MIN_SAMPLES

    thin = MIN_SAMPLES - 1
    rows = keepkv({"a": [0] * thin, "b": [1] * 10}) + unmerged({"a": [1] * thin, "b": [1] * 10})
    (line,) = merging_rows(cells_by_config(rows))[2:]
    assert "undecided (point: no; under 5 samples in 1 of 2 families)" in line and "**no**" not in line
    rows = keepkv({"a": [0] * thin, "b": [0] * 10}) + unmerged({"a": [1] * thin, "b": [1] * 10})
    (line,) = merging_rows(cells_by_config(rows))[2:]
    assert line.endswith("| **no** |")  # b is hurt beyond its interval with 10 samples
    rows = keepkv({"a": [0]}) + rows_for("tova", {"a": [1]})
    (line,) = ranking_rows(cells_by_config(rows))[2:]
    assert line.endswith("| undecided (point: behind; under 5 samples in 1 of 1 families) |")
    rows = (keepkv({"a": [0] * 10}) + rows_for("tova", {"a": [1] * 10})
            + rows_for("snapkv", {"a": [0] * thin}, engine="kvpress"))
    (line,) = ranking_rows(cells_by_config(rows))[2:]
    assert "`tova`" in line and line.endswith("| **behind** |")  # a well-sampled competitor decides "behind"
    rows = keepkv({"a": [0] * thin}) + rows_for("full", {"a": [1] * thin}, budget=1.0)
    (line,) = full_share_rows(cells_by_config(rows))[2:]
    assert "undecided (point: no; under 5 samples" in line and "(the target)" in line


def test_compare_configs_pairs_cells_and_averages_over_families(tmp_path):
    """``tools/compare_configs.py``: the paired difference is the mean over families of each family's mean
    difference on the cells both configurations answered, only ``task_accuracy`` rows of the protocol count, and
    its interval is the one the targets section prints (:func:`keepkv.eval.targets.difference`)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import compare_configs

    def row(method, budget, family, sample, value, metric="task_accuracy_aware"):
        return {"task": "tasks", "metric": metric, "protocol": "aware", "model": "m", "method": method,
                "variant": "", "budget": budget, "family": family, "sample": sample, "value": value,
                "cell": f"{family}/len2048/s{sample}"}

    rows = [row("snapkv", 0.2, "a", 0, 1.0), row("snapkv", 0.2, "a", 1, 0.0), row("snapkv", 0.2, "b", 0, 0.5),
            row("tova", 0.2, "a", 0, 0.0), row("tova", 0.2, "a", 1, 0.0), row("tova", 0.2, "b", 0, 1.0),
            row("tova", 0.2, "b", 1, 1.0),  # no snapkv answer for b/1: not paired
            row("tova", 0.2, "b", 0, 0.0, metric="task_exact_match_aware")]  # another metric: ignored
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lines = compare_configs.table(compare_configs.load_cells(tmp_path / "tasks.jsonl", "aware"), "snapkv")
    tova = next(line for line in lines if "| tova |" in line)
    # family a: (0-1 + 0-0)/2 = -0.5; family b: 1-0.5 = +0.5; mean over families 0; 3 paired cells
    assert "| +0.000 [" in tova and "| 3 |" in tova and "a -0.50, b +0.50" in tova
    assert "| 0.500 |" in tova  # tova's own mean over families: a 0.0, b 1.0
    from keepkv.eval.targets import cells_by_config, difference, paired

    data = cells_by_config(rows)
    value, low, high = difference(paired(data[("m", "aware", "tova", 0.2)], data[("m", "aware", "snapkv", 0.2)]))
    assert f"| {value:+.3f} [{low:+.3f}, {high:+.3f}] |" in tova
    assert compare_configs.load_cells(tmp_path / "tasks.jsonl", "agnostic") == {}


def _tools():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def _kl_row(method, budget, passage, value, metric="kl", **extra):
    return {"task": "fidelity", "metric": metric, "model": "m", "method": method, "variant": "", "budget": budget,
            "cell": f"ctx1024/p{passage}", "value": value, **extra}


def test_compare_configs_pairs_kl_per_passage(tmp_path):
    """``--metric kl``: the fidelity store's ``kl`` rows, paired per passage (other metrics ignored, the latest
    row of a passage wins)."""
    import json

    _tools()
    import compare_configs

    rows = [_kl_row("snapkv", 0.1, 0, 0.2), _kl_row("snapkv", 0.1, 1, 0.4), _kl_row("snapkv", 0.1, 2, 9.0),
            _kl_row("tova", 0.1, 0, 0.3), _kl_row("tova", 0.1, 1, 0.6), _kl_row("tova", 0.1, 1, 0.7),
            _kl_row("tova", 0.1, 0, 5.0, metric="top1")]
    (tmp_path / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lines = compare_configs.table(compare_configs.load_kl_cells(tmp_path / "fidelity.jsonl"), "snapkv")
    tova = next(line for line in lines if "| tova |" in line)
    # passages 0 and 1 shared: (0.3 - 0.2 + 0.7 - 0.4) / 2 = +0.2; tova's own mean (0.3 + 0.7) / 2 = 0.5
    assert "| +0.200 [+0.100, +0.300] | 2 |" in tova and "| 0.500 |" in tova


def test_headline_tables_pair_each_row_with_the_baseline_and_bold_the_best(tmp_path):
    """``tools/headline_tables.py``: a row's mean is taken on the samples it shares with the baseline, its
    bracket is the paired difference, the best paired difference is bold (lowest for KL; the baseline's is 0), a
    missing run is ``–``."""
    import json

    _tools()
    import headline_tables

    rows = [_kl_row("snapkv", 0.1, 0, 0.2), _kl_row("snapkv", 0.1, 1, 0.4),
            _kl_row("tova", 0.1, 0, 0.1), _kl_row("tova", 0.1, 1, 0.3), _kl_row("tova", 0.1, 2, 9.0),
            _kl_row("h2o", 0.2, 0, 0.1)]
    (tmp_path / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = headline_tables.load(tmp_path, "kl")
    lines = headline_tables.table(data, "m", [("SnapKV", "snapkv"), ("TOVA", "tova"), ("H2O", "h2o")], "snapkv",
                                  [("", 0.1), ("", 0.2)], "kl")
    assert lines[0] == "| method | KL 10% | KL 20% |"
    assert lines[2] == "| SnapKV | 0.300 | – |"
    # TOVA on the shared passages 0-1: mean 0.2 (its passage 2 is left out), -0.1 on each: a point interval; bold
    assert lines[3] == "| TOVA | **0.200** (-0.100 [-0.100, -0.100]) | – |"
    assert lines[4] == "| H2O | – | – |"  # no baseline at 20%, no run at 10%
    # bold goes by the paired difference, not the printed mean: TOVA's mean on its easy subset (0.4) is below the
    # baseline's over all its passages (3.2), but TOVA is 0.1 worse on every passage it shares with it
    rows = [_kl_row("snapkv", 0.5, 0, 0.2), _kl_row("snapkv", 0.5, 1, 0.4), _kl_row("snapkv", 0.5, 2, 9.0),
            _kl_row("tova", 0.5, 0, 0.3), _kl_row("tova", 0.5, 1, 0.5)]
    (tmp_path / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lines = headline_tables.table(headline_tables.load(tmp_path, "kl"), "m", [("SnapKV", "snapkv"), ("TOVA", "tova")],
                                  "snapkv", [("", 0.5)], "kl")
    assert lines[2:] == ["| SnapKV | **3.200** |", "| TOVA | 0.400 (+0.100 [+0.100, +0.100]) |"]
    # accuracy: the highest paired difference; a tie at the printed digits bolds both; a row sharing one of the
    # baseline's two families is never bold, however far ahead
    cells = {("m", "aware", "keepkv", 0.2): {"a": {"a/s0": 0.5, "a/s1": 0.7}, "b": {"b/s0": 0.2, "b/s1": 0.4}},
             ("m", "aware", "tova", 0.2): {"a": {"a/s0": 0.5, "a/s1": 0.7}, "b": {"b/s0": 0.2, "b/s1": 0.4}},
             ("m", "aware", "h2o", 0.2): {"a": {"a/s0": 0.4, "a/s1": 0.6}, "b": {"b/s0": 0.1, "b/s1": 0.3}},
             ("m", "aware", "snapkv", 0.2): {"a": {"a/s0": 1.0, "a/s1": 1.0}}}
    lines = headline_tables.table(cells, "m", [("KeepKV", "keepkv"), ("TOVA", "tova"), ("H2O", "h2o"),
                                               ("SnapKV", "snapkv")], "keepkv", [("aware", 0.2)], "task_accuracy")
    assert lines[2:] == ["| KeepKV | **0.45** |", "| TOVA | **0.45** (+0.00 [+0.00, +0.00]) |",
                         "| H2O | 0.35 (-0.10 [-0.10, -0.10]) |", "| SnapKV | 1.00 (+0.40 [+0.30, +0.50]) |"]


def test_needle_depths_counts_each_reference_by_its_place_in_the_context():
    """``tools/needle_depths.py``: each reference of a string-match row counts once, in the bucket of its first
    place in the context; the newest row of a (label, protocol, cell) wins; rows of another source, another
    budget or a QA family are left out; ``full`` is taken at its own budget."""
    _tools()
    import needle_depths

    context = "a" * 50 + "111" + "b" * 40 + "222" + "c" * 4  # 111 at 0.5, 222 at 0.93
    records = {"multivalue/len100/s0": {"task": "multivalue", "context": context, "answers": ["111", "222"]}}

    def row(method, answer, budget=0.2, protocol="aware", source="seed0-essays", scoring="match"):
        return {"task": "tasks", "model": "m", "cell": "multivalue/len100/s0", "method": method, "variant": "",
                "budget": budget, "metric": "task_accuracy_aware", "protocol": protocol, "answer": answer,
                "source": source, "scoring": scoring}

    rows = [row("streamingllm", "111"), row("streamingllm", "only 222"),  # the newest row counts
            row("streamingllm", "111 222", budget=0.5), row("streamingllm", "111", source="seed1-essays"),
            row("full", "111 and 222", budget=1.0), row("full", "222", protocol="agnostic", budget=1.0)]
    counts = needle_depths.found_by_depth(rows, records, "m", 0.2, ["full", "streamingllm"], [0.8], "seed0-essays")
    assert counts == {("aware", "streamingllm", 0): [0, 1], ("aware", "streamingllm", 1): [1, 1],
                      ("aware", "full", 0): [1, 1], ("aware", "full", 1): [1, 1],
                      ("agnostic", "full", 0): [0, 1], ("agnostic", "full", 1): [1, 1]}
    text = needle_depths.table(counts, ["full", "streamingllm"], [0.8])
    assert "| streamingllm | – | – | 0/1 | 1/1 |" in text and "aware [0.8, 1]" in text
