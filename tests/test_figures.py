"""Study tables from probe results (figures.py)."""
import pytest

from bwssl_core.figures import attentive_curve_figure, attentive_rows, best_gain, best_layers

HELD_OUT, ON_VALIDATION = "held-out training clips", "validation (no held-out scores: optimistic)"


def _res(acc_by_pool_family):
    return {pool: {fam: {"acc": acc} for fam, acc in fams.items()} for pool, fams in acc_by_pool_family.items()}


def _probe():
    controls = {"random_init": _res({"mean": {"motion": [0.5, 0.6], "shape": [0.4, 0.3]}}),
                "pixels": _res({"mean": {"motion": [0.7], "shape": [0.2]}})}
    return {"e2e": {"trained": _res({"mean": {"motion": [0.65, 0.8], "shape": [0.5, 0.45]}}), **controls},
            "bwssl-k2": {"trained": _res({"mean": {"motion": [0.69, 0.6], "shape": [0.35, 0.38]}}), **controls}}


def test_best_layers_sets_every_run_beside_both_controls():
    rows = {r["family"]: r for r in best_layers(_probe(), "e2e")}
    assert rows["motion"].pop("margin") == pytest.approx(-0.01)  # K=2 is under the pixels
    assert rows["motion"].pop("layer chosen on") == ON_VALIDATION  # results without held-out scores
    assert rows["motion"] == {"family": "motion", "pooling": "mean", "e2e": 0.8, "bwssl-k2": 0.69,
                              "random init": 0.6, "raw pixels": 0.7}
    assert rows["shape"]["margin"] == pytest.approx(0.38 - 0.4) and rows["shape"]["random init"] == 0.4  # best layer
    gain = best_gain(_probe()["bwssl-k2"])
    assert gain.pop("gain") == pytest.approx(0.09)
    assert gain == {"family": "motion", "pooling": "mean", "trained": 0.69, "random_init": 0.6,
                    "layer chosen on": ON_VALIDATION}


def test_the_best_layer_is_chosen_on_held_out_training_clips_and_scored_on_validation():
    """Where the validation maximum (layer 2) and the held-out one (layers 1 and 3 tie: the earlier) differ, the
    best layer's score is validation's at the held-out choice: the maximum on validation reads high."""
    from bwssl_core.evaluate import best_layer_table

    r = {"acc": [0.6, 0.8, 0.7], "holdout_acc": [0.75, 0.7, 0.75], "R@1": [0.5, 0.9, 0.4]}
    control = {"acc": [0.5, 0.55, 0.3], "holdout_acc": [0.4, 0.3, 0.5]}
    one = {"trained": {"mean": {"motion": r}}, "random_init": {"mean": {"motion": control}},
           "pixels": {"mean": {"motion": {"acc": [0.4], "holdout_acc": [0.45], "R@1": [0.2]}}}}
    probe = {"e2e": one, "k2": {**one, "trained": {"mean": {"motion": {**r, "holdout_acc": [0.7, 0.8, 0.6]}}}}}
    row = best_layers(probe, "e2e")[0]
    assert row == {"family": "motion", "pooling": "mean", "e2e": 0.6, "k2": 0.8, "random init": 0.3,
                   "raw pixels": 0.4, "margin": pytest.approx(0.2), "layer chosen on": HELD_OUT}
    assert best_gain(one) == {"gain": pytest.approx(0.3), "family": "motion", "pooling": "mean", "trained": 0.6,
                              "random_init": 0.3, "layer chosen on": HELD_OUT}
    control["R@1"] = [0.1, 0.2, 0.3]
    table = best_layer_table({"trained": {"mean": {"motion": r}}, "random_init": one["random_init"],
                              "pixels": one["pixels"]}, "R@1")
    assert table == [{"family": "motion", "pooling": "mean", "trained": 0.5, "random_init": 0.3, "pixels": 0.2,
                      "layer chosen on": HELD_OUT}]  # retrieval: at the linear probe's layer
    from bwssl_core.figures import best_acc, best_index

    assert best_index(r) == 0 and best_acc(r) == 0.6 and best_acc(r, "R@1") == 0.5
    assert best_acc({"acc": [0.6, 0.8, 0.7], "holdout_acc": [None] * 3}) == 0.8  # holdout=0: on validation


def test_attentive_rows_show_the_kept_epoch_of_the_budget():
    """Each attentive row reads the last probed layer, with the epoch its held-out score kept, so that one
    kept at the budget's end (perhaps undertrained) shows; results without it (holdout=0) show none."""
    fit = {"acc": [0.7, 0.8], "layers": [-2, -1], "epoch": [12, 50], "epochs": [50, 50]}
    probe = {"e2e": {"trained": {"attentive": {"motion": fit}}, "random_init": {},
                     "pixels": {"attentive": {"motion": {"acc": [0.3], "layers": [0]}}}}}
    rows = attentive_rows(probe)
    assert rows == [{"run": "e2e", "model": "trained", "family": "motion", "layers": "[-2, -1]", "acc": 0.8,
                     "epoch": "50 of 50"},
                    {"run": "e2e", "model": "raw pixels", "family": "motion", "layers": "[0]", "acc": 0.3}]


def test_attentive_curves_mark_the_kept_epoch():
    """One held-out curve per run and control (the last probed layer), and a marker on the epoch kept."""
    def fit(curve):
        best = curve.index(max(curve)) + 1
        return {"acc": [0.0, 0.5], "layers": [-2, -1], "epoch": [1, best], "epochs": [3, 3],
                "holdout_curve": [[0.1, 0.1, 0.1], curve]}
    controls = {"random_init": {"attentive": {"motion": fit([0.2, 0.6, 0.4])}},
                "pixels": {"attentive": {"motion": fit([0.1, 0.1, 0.3])}}}
    probe = {"e2e": {"trained": {"attentive": {"motion": fit([0.3, 0.5, 0.7])}}, **controls},
             "bwssl-k2": {"trained": {"attentive": {"motion": fit([0.4, 0.8, 0.6])}}, **controls}}
    traces = attentive_curve_figure(probe).data
    lines = {t.name: list(t.y) for t in traces if t.mode == "lines"}
    assert lines == {"e2e": [0.3, 0.5, 0.7], "bwssl-k2": [0.4, 0.8, 0.6], "random init": [0.2, 0.6, 0.4],
                     "raw pixels": [0.1, 0.1, 0.3]}
    kept = {t.name: (t.x[0], t.y[0]) for t in traces if t.mode == "markers"}
    assert kept == {"e2e: kept": (3, 0.7), "bwssl-k2: kept": (2, 0.8), "random init: kept": (2, 0.6),
                    "raw pixels: kept": (3, 0.3)}


def test_cka_colours_span_the_values_and_tables_keep_small_differences():
    """A CKA matrix within 0.96-1 gets the whole colour scale (on 0-1 it was one shade of yellow), its
    values printed; table cells keep small values apart (0.00681 against 0.00700) and print counts whole."""
    from bwssl_core.figures import cka_figure, html_table, number

    heat = cka_figure([[1.0, 0.97], [0.963, 0.99]], "t").data[0]
    assert (heat.zmin, heat.zmax) == (0.963, 1) and heat.texttemplate == "%{z:.3f}"
    assert cka_figure([[1.0, 1.0], [1.0, 1.0]], "t").data[0].zmin < 1  # a constant matrix still has a range
    assert [number(v) for v in (0.00681, 0.007, 0.8165, -0.0104, 446.401, 0.0, 0.00999999)] == \
        ["0.00681", "0.00700", "0.817", "-0.010", "446", "0.000", "0.0100"]
    table = html_table([{"run": "<k2>", "error": 0.00681}, {"run": "e2e", "error": 0.007}])
    assert "<td>0.00681</td>" in table and "<td>0.00700</td>" in table and "&lt;k2&gt;" in table


def test_change_curves_draw_the_random_init_control_dashed():
    from bwssl_core.figures import change_figure

    one = {"token_relative_change": [0.5, 0.4], "consecutive_cka": [0.9, 0.95], "knn_overlap": [0.6, 0.7],
           "effective_rank": [5.0, 6.0, 7.0]}
    fig = change_figure({"e2e": one, "random init": one})
    lines = {t.name: t.line for t in fig.data if t.showlegend}
    assert lines["random init"].dash == "dash" and lines["random init"].color == "grey"
    assert lines["e2e"].dash is None and [t.x for t in fig.data][-1] == (1, 2, 3)  # the rank: every layer
    assert all(fig.layout[f"xaxis{i or ''}"].dtick == 1 for i in range(4))  # whole layers, not 2.5


def test_loss_figure_ticks_by_decade_and_names_each_block_once():
    from bwssl_core.figures import loss_figure

    rows = lambda k: [{"step": s, "loss": [1.0 / s] * k} for s in (1, 10, 100)]  # noqa: E731
    fig = loss_figure({"e2e": rows(1), "bwssl-k2": rows(2)})
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1  # 0.01, 0.1, 1: no crowded minor labels
    assert [t.name for t in fig.data if t.showlegend] == ["block 0", "block 1"]


def _table(e2e, k2, rnd, pix=0.3):
    """A final table (notebook 02) of one family: E2E, K=2 and both controls at the last layer."""
    return [{"family": "motion", "model": m, "linear": v, "R@1": v / 2}
            for m, v in [("e2e", e2e), ("bwssl-k2", k2), ("random init", rnd), ("raw pixels", pix)]]


def test_sweep_rows_lead_over_random_init_and_e2e_of_the_same_seed():
    from bwssl_core.figures import sweep_rows

    rows = {r["model"]: r for r in sweep_rows(_table(0.6, 0.7, 0.4) + [{"family": "motion", "model": "other",
                                              "linear": 0.9, "R@1": 0.1}], "cpu", {"e2e": 1, "bwssl-k2": 2}, 3)}
    assert set(rows) == {"e2e", "bwssl-k2", "random init", "raw pixels"}  # a run not of this point is left out
    assert rows["bwssl-k2"]["vs random init"] == pytest.approx(0.3) and rows["bwssl-k2"]["vs E2E"] == pytest.approx(0.1)
    assert rows["e2e"]["vs E2E"] == "" and rows["random init"]["vs random init"] == ""
    assert rows["bwssl-k2"]["seed"] == 3 and rows["bwssl-k2"]["blocks"] == 2 and rows["raw pixels"]["blocks"] == ""
    alone = sweep_rows(_table(0.6, 0.7, 0.4), "cpu", {"bwssl-k2": 2}, 0)  # no K = 1 point: no lead over E2E
    assert all(r["vs E2E"] == "" for r in alone)


def test_seed_summary_means_and_sample_sd_over_seeds():
    from bwssl_core.figures import seed_summary, sweep_figure, sweep_rows

    blocks = {"e2e": 1, "bwssl-k2": 2}
    one = sweep_rows(_table(0.6, 0.7, 0.4), "cpu", blocks, 0)
    single = seed_summary(one)
    assert "linear sd" not in single[0] and single[0]["seeds"] == 1  # one seed: no spread to show
    rows = one + sweep_rows(_table(0.5, 0.8, 0.3), "cpu", blocks, 1) + sweep_rows(_table(0.7, 0.6, 0.5), "cpu", blocks, 2)
    summary = {r["model"]: r for r in seed_summary(rows)}
    k2 = summary["bwssl-k2"]
    assert k2["seeds"] == 3 and k2["linear"] == pytest.approx(0.7) and k2["linear sd"] == pytest.approx(0.1)
    assert k2["vs E2E"] == pytest.approx(0.1) and k2["vs E2E sd"] == pytest.approx(0.2)  # leads 0.1, 0.3, -0.1
    assert k2["vs random init"] == pytest.approx(0.3) and k2["vs random init sd"] == pytest.approx(0.2)  # 0.3, 0.5, 0.1
    assert summary["random init"]["linear"] == pytest.approx(0.4) and summary["random init"]["vs E2E sd"] == ""
    fig = sweep_figure(list(summary.values()))
    line = next(t for t in fig.data if t.mode == "lines+markers")
    assert list(line.x) == [1, 2] and list(line.y) == pytest.approx([0.6, 0.7])
    assert list(line.error_y.array) == pytest.approx([0.1, 0.1]) and line.error_y.visible
    assert "mean over 3 seeds" in fig.layout.title.text
    assert list(fig.layout.xaxis.tickvals) == [1, 2]  # the block counts swept, not log ticks between them


def test_best_layer_rows_keep_the_pooling_apart_over_seeds():
    from bwssl_core.figures import seed_summary, sweep_best_rows

    def best(seed_shift):
        return [{"family": "motion", "pooling": p, "e2e": v + seed_shift, "bwssl-k2": v + 0.05, "random init": 0.4,
                 "raw pixels": 0.3, "margin": 0.0} for p, v in (("mean", 0.5), ("slices", 0.8))]

    rows = sweep_best_rows(best(0.0), "cpu", {"e2e": 1, "bwssl-k2": 2}, 0)
    assert len(rows) == 8 and {r["pooling"] for r in rows} == {"mean", "slices"}  # 2 runs + 2 controls each
    rows += sweep_best_rows(best(0.02), "cpu", {"e2e": 1, "bwssl-k2": 2}, 1)
    summary = {(r["model"], r["pooling"]): r for r in seed_summary(rows)}
    assert len(summary) == 8 and all(r["seeds"] == 2 for r in summary.values())
    k2 = summary["bwssl-k2", "slices"]
    assert k2["best layer"] == pytest.approx(0.85) and k2["vs random init"] == pytest.approx(0.45)
    assert k2["vs E2E"] == pytest.approx(0.04) and k2["vs E2E sd"] == pytest.approx(0.02 / 2 ** 0.5)
    assert summary["e2e", "mean"]["best layer sd"] == pytest.approx(0.02 / 2 ** 0.5)


def test_tables_say_how_their_best_layers_were_chosen():
    """The report says a table's best layers were chosen on held-out training clips only where its rows carry
    that label (best_layers, the sweep's rows made from them); results saved before it: chosen on validation."""
    from bwssl_core.figures import sweep_best_rows

    row = {"family": "motion", "pooling": "mean", "e2e": 0.5, "random init": 0.4, "raw pixels": 0.3, "margin": 0.1}
    old = sweep_best_rows([row], "cpu", {"e2e": 1}, 0)
    new = sweep_best_rows([{**row, "layer chosen on": HELD_OUT}], "cpu", {"e2e": 1}, 0)
    assert all(r["layer chosen on"] == HELD_OUT for r in new) and "layer chosen on" not in old[0]
    from bwssl_core.report import chosen_note

    assert "held-out part of the training clips" in chosen_note(new)
    assert "chosen on validation" in chosen_note(old) and "chosen on validation" in chosen_note([row])
