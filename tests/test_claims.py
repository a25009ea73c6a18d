"""The paper's claims read off results: the noise rule, the decodability onset, the halves of depth."""
import math

import pytest

from bwssl_core import claims


def _probe(curves: dict[str, dict], random: dict, attentive: dict | None = None) -> dict:
    """Depthwise probe results of several runs from {run: {(pooling, family): [top-1 per layer]}}, all runs
    sharing the random-init control `random` ({(pooling, family): [...]})."""
    def nest(flat):
        out = {}
        for (pool, fam), acc in flat.items():
            out.setdefault(pool, {})[fam] = {"acc": acc}
        return out
    return {name: {"trained": {**nest(c), **({"attentive": attentive[name]} if attentive else {})},
                   "random_init": nest(random), "pixels": {}} for name, c in curves.items()}


def test_a_difference_counts_only_beyond_twice_the_sampling_error():
    assert claims.sampling_error(0.5, 100) == pytest.approx(0.05)
    noise = 2 * math.hypot(claims.sampling_error(0.8, 500), claims.sampling_error(0.7, 500))  # 0.0543
    assert claims.compare(0.8, 0.7, 500) == "ahead" and claims.compare(0.7, 0.8, 500) == "behind"
    assert claims.compare(0.7 + noise * 0.9, 0.7, 500) == "within noise"  # about 0.049 above: not beyond
    assert claims.compare(0.8, 0.7, 50) == "within noise"  # the same gap on 50 clips is noise


def test_close_rows_compare_each_best_layer_with_e2e():
    probe = _probe({"e2e": {("mean", "motion"): [0.3, 0.6, 0.5], ("mean", "shape"): [0.9, 0.9, 0.9]},
                    "k2": {("mean", "motion"): [0.4, 0.5, 0.8], ("mean", "shape"): [0.5, 0.6, 0.7]}},
                   {("mean", "motion"): [0.2, 0.2, 0.2], ("mean", "shape"): [0.3, 0.3, 0.3]})
    rows = {r["family"]: r for r in claims.close_rows(probe, "e2e", 500)}
    assert set(rows) == {"motion", "shape"} and all(r["run"] == "k2" for r in rows.values())
    assert rows["motion"]["E2E"] == 0.6 and rows["motion"]["BWSSL"] == 0.8  # best layers, not the last
    assert rows["motion"]["difference"] == pytest.approx(0.2) and rows["motion"]["BWSSL is"] == "ahead"
    assert rows["shape"]["BWSSL is"] == "behind"


def _held_out_probe() -> dict:
    """Two runs whose validation maxima (layer 2) are not the layers best on held-out training clips."""
    probe = _probe({"e2e": {("mean", "motion"): [0.6, 0.8, 0.7]}, "k2": {("mean", "motion"): [0.5, 0.9, 0.65]}},
                   {("mean", "motion"): [0.4, 0.45, 0.3]})
    for res, held in zip(probe.values(), ([0.75, 0.7, 0.75], [0.6, 0.5, 0.7])):
        res["trained"]["mean"]["motion"]["holdout_acc"] = held
    probe["e2e"]["random_init"]["mean"]["motion"]["holdout_acc"] = [0.5, 0.4, 0.5]
    return probe


def test_claim_1_takes_each_layer_chosen_on_held_out_training_clips():
    """Each best layer is the one best on held-out training clips (ties: the earlier), scored on validation, not
    validation's maximum; so is the level of claim 2."""
    probe = _held_out_probe()
    row = claims.close_rows(probe, "e2e", 500)[0]
    assert (row["E2E"], row["BWSSL"]) == (0.6, 0.65) and row["difference"] == pytest.approx(0.05)
    assert row["layer chosen on"] == "held-out training clips"
    earlier = claims.earlier_rows(probe, "e2e", 500)[0]  # level 0.4 + 0.5 * (0.65 - 0.4), not from 0.9 and 0.45
    assert earlier["level"] == pytest.approx(0.525)


def test_claim_1_sets_both_controls_beside_each_row():
    """The random-init encoder's and raw pixels' best layers (the same rule) stand beside each row of claim 1."""
    probe = _held_out_probe()
    probe["e2e"]["pixels"] = {"mean": {"motion": {"acc": [0.35], "holdout_acc": [0.3]}}}
    row = claims.close_rows(probe, "e2e", 500)[0]
    assert (row["random init"], row["raw pixels"]) == (0.4, 0.35)  # random init: layer 1, not validation's 0.45
    assert "raw pixels" not in claims.close_rows(_held_out_probe(), "e2e", 500)[0]  # results without the control


def test_onset_is_the_first_layer_reaching_a_level_shared_by_the_runs():
    assert claims.onset([0.1, 0.5, 0.4, 0.9], 0.45) == 2 and claims.onset([0.1, 0.2], 0.5) is None
    probe = _probe({"e2e": {("slices", "motion"): [0.3, 0.4, 0.7, 0.9], ("slices", "colour"): [0.9, 0.9, 0.9, 0.9],
                            ("slices", "speed"): [0.3, 0.4, 0.5, 0.55]},
                    "k2": {("slices", "motion"): [0.7, 0.8, 0.8, 0.8], ("slices", "colour"): [0.9, 0.9, 0.9, 0.9],
                           ("slices", "speed"): [0.3, 0.35, 0.4, 0.4]}},
                   {("slices", "motion"): [0.2, 0.3, 0.3, 0.3], ("slices", "colour"): [0.9, 0.9, 0.9, 0.9],
                    ("slices", "speed"): [0.3, 0.3, 0.3, 0.3]})
    rows = {r["family"]: r for r in claims.earlier_rows(probe, "e2e", 500)}
    assert "colour" not in rows  # no learned gain over random init: no onset to compare
    motion = rows["motion"]  # level 0.3 + 0.5 * (0.9 - 0.3) = 0.6: E2E at layer 3, K2 at layer 1
    assert motion["level"] == pytest.approx(0.6)
    assert (motion["E2E layer"], motion["BWSSL layer"], motion["BWSSL is"]) == (3, 1, "earlier")
    speed = rows["speed"]  # level 0.425: E2E at layer 3, K2 never (counted past the last layer)
    assert (speed["E2E layer"], speed["BWSSL layer"], speed["BWSSL is"]) == (3, "never", "later")


def test_saturation_compares_the_two_halves_of_depth():
    assert claims.halves([1.0, 2.0, 3.0], 2, 4) == (1.0, 2.5)  # layers 2 | 3, 4
    early, late = claims.halves([1.0] * 5 + [3.0] * 6, 2, 12)  # layers 2-6 | 7-12
    assert (early, late) == (1.0, 3.0)
    analysis = {"e2e": {"layers": 4, "token_relative_change": [0.6, 0.4, 0.2], "knn_overlap": [0.8, 0.85, 0.95],
                        "consecutive_cka": [0.9, 0.95, 0.99]}}
    row = claims.saturate_rows(analysis)[0]
    assert row["change, first half"] == 0.6 and row["change, second half"] == pytest.approx(0.3)
    assert row["second / first"] == pytest.approx(0.5) and row["kNN overlap, second half"] == pytest.approx(0.9)


def test_the_summary_says_what_each_claim_shows_run_by_run():
    curves = {("mean", "motion"): [0.3, 0.4, 0.5, 0.6]}
    attentive = {n: {"motion": {"layers": [-1], "acc": [a]}} for n, a in (("e2e", 0.9), ("k2", 0.62))}
    probe = _probe({"e2e": curves, "k2": {("mean", "motion"): [0.6, 0.6, 0.6, 0.6]}}, {("mean", "motion"): [0.2] * 4},
                   attentive)
    change = {"layers": 4, "token_relative_change": [0.6, 0.4, 0.2], "pooled_relative_change": [0.5, 0.4, 0.2],
              "knn_overlap": [0.8, 0.85, 0.95], "consecutive_cka": [0.9, 0.95, 0.99]}
    analysis = {"e2e": change, "k2": {**change, "token_relative_change": [0.3, 0.6, 0.6]}, "random init": change}
    layers = lambda entropy: [{"entropy_mean": e, "spatial_px_mean": 30.0, "temporal_frames_mean": 5.0,  # noqa: E731
                               "self_mean": 0.01} for e in entropy]
    attention = {"e2e": layers([5.0, 5.2, 5.9, 5.9]), "k2": layers([5.8, 5.8, 5.0, 5.0]), "random init": layers([6.0] * 4)}
    uniform = {"entropy": 6.1, "spatial_px": 33.0, "temporal_frames": 5.25, "self": 0.002}
    said = claims.summary(probe, analysis, "e2e", 500, attention, uniform)
    lines = {line["claim"]: line["what the numbers say"] for line in said["lines"]}
    assert all(line["run"] == "k2" for line in said["lines"])
    assert lines["1. BWSSL gets close to E2E"] == "0 ahead, 1 within noise, 1 behind (of 2)"  # mean; attentive
    assert lines["2. information is decodable earlier"].startswith("1 earlier, 0 same, 0 later")  # layer 1 against 2
    assert "2.00 (E2E 0.50, random init 0.50)" in lines["3. late blocks saturate"]
    assert "change more than E2E's" in lines["3. late blocks saturate"]
    assert "0.300 nats (E2E 1.000, random init 0.100)" in lines["4. stronger early mixing"]  # first half: 2 layers
    assert "more spread than E2E's" in lines["4. stronger early mixing"]
    assert "layer 4" in said["lines"][-1]["measure"] and "0.620 against 0.600" in said["lines"][-1]["what the numbers say"]
    mixing = {r["model"]: r for r in said["mixing"]}
    assert mixing["e2e"]["token - pooled change, first half"] == pytest.approx(0.1)
    assert mixing["e2e"]["attentive - mean pooling (motion)"] == pytest.approx(0.3)
    assert mixing["uniform attention"]["entropy (nats), first half"] == 6.1
    assert claims.summary({"e2e": probe["e2e"]}, analysis, "e2e", 500) is None  # nothing to compare


def test_over_seeds_a_lead_counts_when_it_has_one_sign_on_every_seed():
    def row(seed, model, family, lead):
        return {"preset": "cpu", "seed": seed, "model": model, "blocks": 2 if model == "k2" else 1, "family": family,
                "pooling": "mean", "best layer": 0.5, "vs random init": 0.1, "vs E2E": lead}
    best = [row(s, "e2e", f, "") for s in range(3) for f in ("motion", "shape")]
    best += [row(s, "k2", "motion", lead) for s, lead in enumerate([0.01, 0.03, 0.02])]
    best += [row(s, "k2", "shape", lead) for s, lead in enumerate([0.05, -0.01, 0.02])]
    best.append(row(0, "k4", "motion", 0.1))  # one seed only: nothing to say over seeds
    rows = {r["family"]: r for r in claims.seed_rows(best)}
    assert set(rows) == {"motion", "shape"} and rows["motion"]["seeds"] == 3
    assert rows["motion"]["vs E2E"] == pytest.approx(0.02) and rows["motion"]["sd"] == pytest.approx(0.01)
    assert rows["motion"]["BWSSL is"] == "ahead on every seed" and rows["shape"]["BWSSL is"] == "mixed"
    line = claims._seed_lines(claims.seed_rows(best), "k2")[0]["what the numbers say"]
    assert line == "1 ahead on every seed, 1 mixed, 0 behind on every seed (of 2); chance alone: 0.25 ahead and " \
                   "0.25 behind on every seed"  # two rows, each of one sign on 3 seeds with probability 1/8


def test_claims_2_and_3_over_seeds_count_every_seed_of_the_runs_they_all_have():
    def seed(k2_motion, k2_change):
        probe = _probe({"e2e": {("mean", "motion"): [0.2, 0.6, 0.8]}, "k2": {("mean", "motion"): k2_motion}},
                       {("mean", "motion"): [0.2, 0.2, 0.2]})
        change = {"layers": 4, "token_relative_change": [0.6, 0.3, 0.3], "pooled_relative_change": [0.6, 0.3, 0.3],
                  "knn_overlap": [0.9] * 3, "consecutive_cka": [0.99] * 3}
        return claims.summary(probe, {"e2e": change, "k2": {**change, "token_relative_change": k2_change}}, "e2e", 500)
    said = {0: seed([0.6, 0.8, 0.8], [0.5, 0.6, 0.6]), 3: seed([0.2, 0.2, 0.8], [0.5, 0.4, 0.4])}
    lines = {line["claim"]: line for line in claims.over_seeds(said)}
    assert lines["2. information is decodable earlier, over seeds"]["what the numbers say"] == \
        "1 earlier, 0 same, 1 later (of 2)"  # level 0.5: K2 at layer 1 on seed 0, layer 3 on seed 3; E2E layer 2
    saturate = lines["3. late blocks saturate, over seeds"]
    assert "seeds 0, 3" in saturate["measure"]
    assert saturate["what the numbers say"] == "1.20, 0.80 (E2E 0.50, 0.50): BWSSL's late layers change more " \
                                               "than E2E's on 2 of 2 seeds"
    said[3]["close"] = [{**r, "run": "k4"} for r in said[3]["close"]]  # another run on seed 3: none in common
    assert claims.over_seeds(said) == []


def test_the_report_reads_each_seed_of_the_main_preset_from_the_sweep(tmp_path):
    from bwssl_core.io import save_json
    from bwssl_core.report import _claims
    from bwssl_core.study import point_path, results_path

    change = {"layers": 4, "clips": 500, "token_relative_change": [0.6, 0.3, 0.3],
              "pooled_relative_change": [0.6, 0.3, 0.3], "knn_overlap": [0.9] * 3, "consecutive_cka": [0.99] * 3}
    results = {"probe": _probe({"e2e": {("mean", "motion"): [0.2, 0.6, 0.8]}, "k2": {("mean", "motion"): [0.6] * 3}},
                               {("mean", "motion"): [0.2] * 3}),
               "analysis": {"e2e": change, "k2": {**change, "token_relative_change": [0.3, 0.6, 0.6]}},
               "reference": "e2e"}
    save_json(results_path(point_path(tmp_path, "cpu", 7), "02_probe"), results)
    pre, sweep = {"parameters": {"preset": "cpu", "seed": 0}}, {"seeds": [0, 7], "best_rows": []}
    said = _claims(tmp_path, results, None, pre, sweep)  # no val_clips: the analysis' clip count
    assert said["val_clips"] == 500
    over = [line for line in said["lines"] if "over seeds" in line["claim"]]
    assert [line["claim"][:2] for line in said["lines"]] == sorted(line["claim"][:2] for line in said["lines"])
    assert len(over) == 2 and all("seeds 0, 7" in line["measure"] for line in over)
    assert _claims(tmp_path, results, None, {"parameters": {"preset": "tiny", "seed": 0}}, sweep)["lines"] == \
        [line for line in said["lines"] if line not in over]  # another preset's sweep: no seeds to read
    # a sweep point without K = 1 (points cpu:2, cpu:4) measures against its smallest K, which its claims would
    # call E2E: K = 4's claims over seeds would mix "against E2E" (seed 0) with "against K = 2" (seed 7)
    curves = {("mean", "motion"): [0.6] * 3}
    main = {**results, "probe": {**results["probe"], "k4": results["probe"]["k2"]},
            "analysis": {**results["analysis"], "k4": results["analysis"]["k2"]}}
    point = {"probe": _probe({"k2": curves, "k4": curves}, {("mean", "motion"): [0.2] * 3}),
             "analysis": {"k2": change, "k4": change}, "reference": "k2", "blocks": {"k2": 2, "k4": 4}}
    save_json(results_path(point_path(tmp_path, "cpu", 7), "02_probe"), point)
    assert not [line for line in _claims(tmp_path, main, None, pre, sweep)["lines"] if "over seeds" in line["claim"]]


def test_early_mixing_is_paired_clip_by_clip_when_the_clips_are_kept():
    probe = _probe({"e2e": {("mean", "motion"): [0.3] * 4}, "k2": {("mean", "motion"): [0.3] * 4}},
                   {("mean", "motion"): [0.2] * 4})
    change = {"layers": 4, "token_relative_change": [0.5] * 3, "pooled_relative_change": [0.5] * 3,
              "knn_overlap": [0.9] * 3, "consecutive_cka": [0.99] * 3}
    e2e = [5.0, 5.2, 4.8, 5.0]  # each clip's entropy in layers 1 and 2; layers 3 and 4 do not count

    def layers(per_clip):
        return [{"layer": i, "entropy_mean": sum(per_clip) / 4, "spatial_px_mean": 30.0, "temporal_frames_mean": 5.0,
                 "self_mean": 0.01, "clips": {"entropy": per_clip if i < 2 else [0.0] * 4, "spatial_px": [30.0] * 4,
                                              "temporal_frames": [5.0] * 4, "self": [0.01] * 4}} for i in range(4)]
    uniform = {"entropy": 6.0, "spatial_px": 33.0, "temporal_frames": 5.25, "self": 0.002}

    def says(k2):
        said = claims.summary(probe, {"e2e": change, "k2": change}, "e2e", 500,
                              {"e2e": layers(e2e), "k2": layers(k2)}, uniform)
        return next(line["what the numbers say"] for line in said["lines"] if line["claim"] == "4. stronger early mixing")
    steady = says([e + d for e, d in zip(e2e, [0.5, 0.4, 0.6, 0.5])])  # higher entropy on every clip: more spread
    assert "paired over 4 clips, +0.500 ± 0.041" in steady and "is more spread than E2E's" in steady
    noisy = says([e + d for e, d in zip(e2e, [0.5, -0.5, 0.4, -0.2])])  # the mean moves, the clips disagree
    assert "is no differently spread than E2E's" in noisy and "direction only" not in noisy
    assert claims.early_clips(layers(e2e), "entropy") == e2e
    assert claims.early_clips([{k: v for k, v in r.items() if k != "clips"} for r in layers(e2e)], "entropy") is None
    k2 = layers([e + d for e, d in zip(e2e, [0.5, 0.4, 0.6, 0.5])])
    rows = claims.mixing_rows(probe, {}, {"e2e": layers(e2e), "k2": k2}, uniform, "e2e")
    assert rows[-1]["model"] == "k2 - e2e, paired over 4 clips"
    assert rows[-1]["entropy (nats), first half"] == "+0.5 ± 0.041"
    assert rows[-1]["distance (px), first half"] == "+0 ± 0"  # the same distances on every clip


def test_an_onset_where_e2e_never_reaches_the_level_is_told_apart():
    rows = [{"BWSSL is": "earlier", "E2E layer": "never"}, {"BWSSL is": "earlier", "E2E layer": 3},
            {"BWSSL is": "same", "E2E layer": "never"}]
    assert claims._onsets(rows) == "2 earlier, 1 same, 0 later (of 3); E2E never reaches the level in 1 of the earlier"
    assert claims._onsets(rows[1:2]) == "1 earlier, 0 same, 0 later (of 1)"
    assert claims._onsets([]) == "no family with a learned gain"


def test_a_half_without_layers_is_nan_not_an_error():
    early, late = claims.halves([], 2, 1)  # one layer: no change between layers to measure
    assert math.isnan(early) and math.isnan(late)
    early, late = claims.halves([0.4], 2, 2)  # two layers: layer 2 is the second half
    assert math.isnan(early) and late == 0.4
    # three layers: no ratio, so claim 3 says no direction (nan < nan read as "more" before), and over seeds
    # it counts no seed
    probe = _probe({"e2e": {("mean", "motion"): [0.2, 0.6, 0.8]}, "k2": {("mean", "motion"): [0.3, 0.6, 0.8]}},
                   {("mean", "motion"): [0.2] * 3})
    change = {"layers": 3, "token_relative_change": [0.1, 0.1], "pooled_relative_change": [0.1, 0.1],
              "knn_overlap": [0.9] * 2, "consecutive_cka": [0.99] * 2}
    said = claims.summary(probe, {"e2e": change, "k2": {**change, "token_relative_change": [0.9, 0.9]}}, "e2e", 500)
    line = {r["claim"]: r["what the numbers say"] for r in said["lines"]}["3. late blocks saturate"]
    assert line.startswith("nan (E2E nan): undefined: no layer of the first half") and "more" not in line
    assert [r["claim"] for r in claims.over_seeds({0: said, 1: said})] == ["2. information is decodable earlier, "
                                                                          "over seeds"]


def test_onsets_over_seeds_count_only_what_every_seed_probed():
    def seed(poolings):
        curves = {p: [0.2, 0.6, 0.8] for p in poolings}
        probe = _probe({"e2e": {(p, "motion"): c for p, c in curves.items()},
                        "k2": {(p, "motion"): [0.8, 0.8, 0.8] for p in poolings}},
                       {(p, "motion"): [0.2] * 3 for p in poolings})
        change = {"layers": 4, "token_relative_change": [0.6, 0.3, 0.3], "pooled_relative_change": [0.6, 0.3, 0.3],
                  "knn_overlap": [0.9] * 3, "consecutive_cka": [0.99] * 3}
        return claims.summary(probe, {"e2e": change, "k2": change}, "e2e", 500)
    said = {0: seed(("mean", "slices", "grid")), 1: seed(("mean", "slices"))}  # the main study probes the grid too
    assert len(said[0]["earlier"]) == 3
    line = next(x for x in claims.over_seeds(said) if x["claim"].startswith("2."))
    assert line["what the numbers say"] == "4 earlier, 0 same, 0 later (of 4)"  # not 5: seed 1 has no grid
    assert "poolings mean, slices" in line["measure"]


def test_a_run_only_the_sweep_trained_gets_its_claims_over_seeds(tmp_path):
    from bwssl_core.io import save_json
    from bwssl_core.report import _claims
    from bwssl_core.study import point_path

    change = {"layers": 4, "clips": 500, "token_relative_change": [0.6, 0.3, 0.3],
              "pooled_relative_change": [0.6, 0.3, 0.3], "knn_overlap": [0.9] * 3, "consecutive_cka": [0.99] * 3}

    def results(runs):
        curves = {"e2e": {("mean", "motion"): [0.2, 0.6, 0.8]}, **{r: {("mean", "motion"): [0.6] * 3} for r in runs}}
        return {"probe": _probe(curves, {("mean", "motion"): [0.2] * 3}),
                "analysis": {"e2e": change, **{r: {**change, "token_relative_change": [0.3, 0.6, 0.6]} for r in runs}},
                "reference": "e2e"}
    main = results(["k2"])  # the study's own runs; the sweep's points add k8 on seeds 0 and 7
    for seed in (None, 7):
        save_json(point_path(tmp_path, "cpu", seed) / "results" / "02_probe.json", results(["k2", "k8"]))
    best = [{"preset": "cpu", "seed": s, "model": m, "blocks": k, "family": "motion", "pooling": "mean",
             "best layer": 0.6, "vs random init": 0.4, "vs E2E": lead}
            for s in (0, 7) for m, k, lead in (("e2e", 1, ""), ("k2", 2, -0.1), ("k8", 8, 0.02 + s / 100))]
    said = _claims(tmp_path, main, None, {"parameters": {"preset": "cpu", "seed": 0}},
                   {"seeds": [0, 7], "best_rows": best})
    k8 = {line["claim"]: line["what the numbers say"] for line in said["lines"] if line["run"] == "k8"}
    assert k8["1. BWSSL gets close to E2E, over seeds"] == \
        "1 ahead on every seed, 0 mixed, 0 behind on every seed (of 1); chance alone: 0.25 ahead and 0.25 behind " \
        "on every seed"  # one row over two seeds: each sign on both seeds one time in four
    assert k8["2. information is decodable earlier, over seeds"] == "2 earlier, 0 same, 0 later (of 2)"
    assert k8["3. late blocks saturate, over seeds"].startswith("2.00, 2.00 (E2E 0.50, 0.50)")
    assert {line["run"] for line in said["lines"] if "over seeds" not in line["claim"]} == {"k2"}  # seed 0 alone
