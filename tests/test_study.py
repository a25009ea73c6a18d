"""The study pipeline: notebooks executed by Papermill, failures named, reruns that continue."""
import json
from pathlib import Path

import jupytext
import pytest
from hypothesis import given, settings, strategies as st

from bwssl_core import ConfigError
from bwssl_core.cli import main
from bwssl_core.io import RunError
from bwssl_core.notebook import NOTEBOOKS, check, defaults
from bwssl_core.io import save_json
from bwssl_core.study import NOTEBOOK_ORDER, SMOKE, check_study, main_probe, results_path, run_name, run_study


def test_every_notebook_is_paired_and_in_sync():
    for py in sorted(NOTEBOOKS.glob("[0-9]*.py")):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb} missing: run `jupytext --sync {py}`"
        a, b = jupytext.read(py), jupytext.read(ipynb)
        assert [(c.cell_type, c.source) for c in a.cells] == [(c.cell_type, c.source) for c in b.cells], py
        assert all(not c.get("outputs") for c in b.cells), f"{ipynb} holds outputs"
        assert "parameters" in b.cells[[c.source for c in b.cells].index(
            next(c.source for c in a.cells if "parameters" in c.metadata.get("tags", [])))].metadata["tags"]


def test_study_failure_is_named_and_a_rerun_continues(tmp_path, capsys):
    """(With the data as clip tensors, as the GPU study keeps them; the notebooks' own tests and the
    browser test read mp4 data.)"""
    out, data = tmp_path / "study", tmp_path / "data"
    params = {**SMOKE, "data": str(data), "data_format": "tensor", "points": ["tiny:1", "tiny:4"], "dec_depth": 2,
              "seeds": [1], "depth": 8}
    with pytest.raises(RunError, match="notebook 02_probe failed in cell"):
        run_study(out, {**params, "families": ["texture"]})
    failed = json.loads((out / "FAILED.json").read_text())
    assert failed["notebook"] == "02_probe" and "texture" in failed["message"] and failed["cell"] > 0
    assert results_path(out, "01_pretrain").exists() and not results_path(out, "02_probe").exists()
    trained = (out / "runs" / "e2e" / "checkpoint.pt").stat().st_mtime_ns
    first = (out / "01_pretrain.ipynb").stat().st_mtime_ns
    with pytest.raises(RunError, match="already holds a study"):
        run_study(out, params)  # never silently over a study
    # --resume takes the parameters the study was started with, the faulty one too: -p corrects it
    assert main(["study", "--smoke", "--resume", "--out", str(out), "-p", "families", "[]"]) == 0
    assert (data / "train.pt").exists() and not (data / "train.csv").exists()
    assert (out / "01_pretrain.ipynb").stat().st_mtime_ns == first  # finished: not run again
    assert (out / "runs" / "e2e" / "checkpoint.pt").stat().st_mtime_ns == trained
    assert not (out / "FAILED.json").exists()
    for name in NOTEBOOK_ORDER:
        assert results_path(out, name).exists() and (out / f"{name}.ipynb").exists(), name
    probe = json.loads(results_path(out, "02_probe").read_text())
    report = (out / "report.html").read_text()
    assert "Final table" in report and "bwssl-k2" in report and "random init" in report
    assert "Token-level (attentive) probe" in report and "Patch level" in report and "effective tubes" in report
    assert {r["model"] for r in probe["table"]} == {"e2e", "bwssl-k2", "random init", "raw pixels"}
    assert set(probe["best_gain"]) == {"e2e", "bwssl-k2"}
    motion = [r for r in probe["best_layers"] if r["family"] == "motion"]
    assert {r["pooling"] for r in motion} == {*probe["poolings"], "attentive"}
    assert {"e2e", "bwssl-k2", "random init", "raw pixels", "margin"} <= set(motion[0])
    assert "Best layer of every run against both controls" in report
    claims = report.split("The paper's claims on this data")[1].split("Pretraining")[0]  # read off the results
    assert probe["val_clips"] > 0 and "1. BWSSL gets close to E2E" in claims and "4. stronger early mixing" in claims
    control = probe["analysis"]["random init"]  # the change curves and the CKA against E2E carry the control
    assert len(control["cka_across"]) == len(probe["analysis"]["e2e"]["cka_within"])
    assert "CKA across: random init" in report
    assert "held-out top-1 by epoch" in report  # the attentive probes' curves
    patch_level = report.split("Patch level")[1]  # attention by layer: entropy too, and the random-init control
    assert "Attention entropy" in patch_level and '"name":"random init"' in patch_level
    assert "over the first 16 clips of the val split" in patch_level and "for clip 0," in patch_level
    assert "Attention to where the clip moves" in patch_level
    kept = probe["probe"]["e2e"]["pixels"]["attentive"]["motion"]
    assert 1 <= kept["epoch"][-1] <= kept["epochs"][-1] == len(kept["holdout_curve"][-1])
    swept = json.loads(results_path(out, "04_sweep").read_text())
    assert swept["seeds"] == [0, 1]  # notebook 01's seed, then the further one
    sweep = [r for r in swept["rows"] if r["seed"] == 0]
    assert {(r["model"], r["blocks"]) for r in sweep} == \
        {("e2e", 1), ("bwssl-k4", 4), ("random init", ""), ("raw pixels", "")}  # the runs and both controls
    again = {(r["model"], r["family"]): r for r in swept["rows"] if r["seed"] == 1}
    assert set(again) == {(r["model"], r["family"]) for r in sweep}  # every run and control under seed 1 too
    seed1 = out / "sweep" / "tiny-seed1" / "runs"
    for name in ("e2e", "bwssl-k4"):  # trained again under seed 1, not linked
        assert not (seed1 / name).is_symlink()
        config = json.loads((seed1 / name / "config.json").read_text())
        assert config["train"]["seed"] == 1 and config["model"]["depth"] == 8  # notebook 01's depth: its preset's
    assert json.loads((out / "runs" / "bwssl-k2" / "config.json").read_text())["model"]["depth"] == 8
    assert len(probe["probe"]["e2e"]["trained"]["mean"]["motion"]["acc"]) == 8  # a curve over all 8 layers
    summary = {(r["model"], r["family"]): r for r in swept["summary"]}
    k4 = summary["bwssl-k4", "motion"]
    by_seed = [r["vs E2E"] for r in swept["rows"] if (r["model"], r["family"]) == ("bwssl-k4", "motion")]
    assert k4["seeds"] == 2 and k4["vs E2E"] == pytest.approx(sum(by_seed) / 2)
    assert k4["vs E2E sd"] == pytest.approx(abs(by_seed[0] - by_seed[1]) / 2 ** 0.5)
    best = {(r["model"], r["family"], r["pooling"]): r for r in swept["best_summary"]}
    assert {p for _, _, p in best} == {"mean", "slices"} and all(r["seeds"] == 2 for r in best.values())
    by_seed = [r["best layer"] for r in swept["best_rows"] if r["model"] == "bwssl-k4" and r["family"] == "motion"
               and r["pooling"] == "slices"]
    assert best["bwssl-k4", "motion", "slices"]["best layer"] == pytest.approx(sum(by_seed) / 2)
    gain = {(r["model"], r["family"]): r["vs random init"] for r in sweep}
    lin = {(r["model"], r["family"]): r["linear"] for r in sweep}
    assert gain["bwssl-k4", "motion"] == pytest.approx(lin["bwssl-k4", "motion"] - lin["random init", "motion"])
    assert (out / "sweep" / "tiny" / "runs" / "e2e").is_symlink()  # the main study's run, not trained again
    assert (out / "sweep" / "tiny" / "runs" / "bwssl-k4" / "checkpoint.pt").exists()
    for run in ("runs/e2e", "sweep/tiny/runs/bwssl-k4"):  # the tiny preset has 1 decoder layer; 2 were asked
        assert json.loads((out / run / "config.json").read_text())["model"]["dec_depth"] == 2, run
    (out / "report.html").unlink()  # `bwssl report` writes it again from the results, and prints the claims
    capsys.readouterr()
    assert main(["report", "--study", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(out / "report.html") and "The paper's claims" in (out / "report.html").read_text()
    said = [(c["claim"], c["run"]) for c in printed["claims"]]
    assert said[0] == ("1. BWSSL gets close to E2E", "bwssl-k2")
    # K=4 only the sweep trained (seeds 0 and 1): its claims over seeds, from the sweep's points
    assert {c for c, run in said if run == "bwssl-k4"} == {"1. BWSSL gets close to E2E, over seeds",
                                                          "2. information is decodable earlier, over seeds",
                                                          "3. late blocks saturate, over seeds"}
    assert main(["report", "--study", str(tmp_path / "data")]) == 2
    assert "not a study folder" in capsys.readouterr().err


def test_sweep_takes_the_main_probe_only_when_it_covers_every_run(tmp_path):
    assert main_probe(tmp_path, ["e2e"]) is None  # nothing probed yet
    save_json(results_path(tmp_path, "02_probe"), {"parameters": {"runs": ["e2e", "bwssl-k2"]}})
    assert main_probe(tmp_path, ["e2e", "bwssl-k2"]) == results_path(tmp_path, "02_probe")
    assert main_probe(tmp_path, ["e2e", "bwssl-k4"]) is None


def test_notebook_02_probes_every_run_notebook_01_trains():
    """`blocks` alone (the GPU scale's [1, 2, 4], or -p blocks) gives notebook 02 every run, so that the
    final table has them all and the sweep finds them probed; a given `runs` wins."""
    from bwssl_core.study import GPU, notebook_params, sweep_points

    probe = notebook_params(GPU, "02_probe")
    assert probe["runs"] == ["e2e", "bwssl-k2", "bwssl-k4"] and "blocks" not in probe
    assert notebook_params({"blocks": [1, 6]}, "02_probe")["runs"] == ["e2e", "bwssl-k6"]
    assert notebook_params({"blocks": [1, 2], "runs": ["e2e"]}, "02_probe")["runs"] == ["e2e"]
    assert "runs" not in notebook_params({"blocks": 2}, "02_probe")  # left to notebook 01's check
    assert notebook_params(GPU, "01_pretrain")["blocks"] == [1, 2, 4] and "runs" not in notebook_params(GPU, "01_pretrain")
    names = [run_name(k) for k in sweep_points(GPU["points"])[GPU["preset"]]]  # the sweep's points are probed
    assert set(names) <= set(probe["runs"])


def test_bad_study_parameters_stop_before_anything_runs(tmp_path):
    for params, message in [({"stepz": 3}, "unknown study parameter.*stepz"),
                            ({"blocks": 2}, "parameter blocks=2 is a int, expected list"),
                            ({"blocks": [1, 3]}, "blocks=3: expected a divisor of depth=4"),
                            ({"preset": "vit_x"}, "unknown preset 'vit_x'"),
                            ({"points": ["cpu"]}, "sweep point 'cpu': expected 'preset:K'"),
                            ({"points": ["tiny:3"]}, "blocks=3: expected a divisor of depth=4"),
                            ({"seeds": [1, -2]}, r"sweep seeds \[-2\]: expected non-negative integers"),
                            ({"depth": 6, "blocks": [1, 4]},
                             r"blocks=\[1, 4\] of preset 'cpu', depth=6: blocks=4: expected a divisor of depth=6"),
                            ({"depth": 8, "points": ["cpu:1", "cpu:3"]}, r"sweep point 'cpu:3' \(depth=8\)"),
                            ({"depth": -1}, "depth=-1: expected a positive integer"),
                            # notebook 01's training values, named as given (batch_size=0 was a ZeroDivisionError
                            # in the notebook, lr=-1e-3 a base_lr=-0.016 no one gave)
                            ({"batch_size": 0}, "batch_size=0: expected a positive integer"),
                            ({"lr": -1e-3}, r"lr=-0.001: expected a finite number > 0"),
                            ({"steps": 0}, "steps=0: expected a positive integer"),
                            ({"mask_ratio": 1.0}, "mask_ratio=1.0"),
                            ({"dec_keep": 0.0}, "dec_keep=0.0"),
                            ({"blocks": [2, 4]}, r"reference='e2e': not one of notebook 02's runs \['bwssl-k2', "
                                                 r"'bwssl-k4'\]"),
                            ({"poolings": ["slices"]}, r"poolings=\['slices'\]: expected 'mean' among them"),
                            # analyze() failed on it only after all of notebook 02's probes
                            ({"cka_batch": 3}, "cka_batch=3: expected at least 4")]:
        with pytest.raises(ConfigError, match=message):
            run_study(tmp_path / "s", params)
        assert not (tmp_path / "s").exists()  # nothing written: the corrected call can use the same --out
    check_study({"depth": 8, "blocks": [1, 2, 4], "points": ["cpu:4", "tiny:4"]})  # tiny keeps its own depth, 4
    with pytest.raises(ConfigError, match="parameter steps='many' is a str, expected int"):
        check({"steps": "many"}, "01_pretrain")
    with pytest.raises(ConfigError, match="parameter blocks=.* expected list"):
        check({"blocks": 2}, "01_pretrain")


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted({k for n in NOTEBOOK_ORDER for k in defaults(n)}) + ["bogus", "Steps"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-5, 10 ** 6), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(-3, 5), max_size=3),
                       st.lists(st.text(max_size=4), max_size=3)))
def test_any_notebook_parameter_is_taken_or_refused_by_name(name, value):
    for notebook in NOTEBOOK_ORDER:
        try:
            merged = check({name: value}, notebook)
        except ConfigError as err:
            assert name in str(err)
        else:
            assert merged[name] is value  # the given object itself (NaN included)


def test_each_scale_is_a_valid_parameter_set():
    from bwssl_core.study import GPU, scale_params

    assert scale_params("auto", cuda=True) == GPU and scale_params("auto", cuda=False) == {}
    assert scale_params("smoke", cuda=True) == SMOKE
    for scale in ("cpu", "gpu", "smoke"):
        params = scale_params(scale, cuda=False)
        for name in NOTEBOOK_ORDER:  # every name is some notebook's, with that notebook's type
            taken = {k: v for k, v in params.items() if k in defaults(name)}
            assert check(taken, name) is not None
        assert set(params) <= {k for n in NOTEBOOK_ORDER for k in defaults(n)}, scale
    with pytest.raises(ConfigError, match="scale='huge'"):
        scale_params("huge", cuda=False)


def test_a_study_never_takes_over_a_folder_nor_changes_a_finished_notebook(tmp_path):
    """A new study refuses a non-empty folder that holds none; --resume refuses a folder without a study,
    and a parameter that a finished notebook was run with, naming it (the report would misstate it)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "01_pretrain.ipynb").write_text("precious")
    with pytest.raises(RunError, match="is not empty and holds no study"):
        run_study(tmp_path / "mine", {})
    with pytest.raises(RunError, match="no study.json, so no study to resume"):
        run_study(tmp_path / "mine", None, resume=True)
    assert (tmp_path / "mine" / "01_pretrain.ipynb").read_text() == "precious"
    study = tmp_path / "study"
    save_json(study / "study.json", {"params": {"steps": 20}, "notebooks": list(NOTEBOOK_ORDER)})
    save_json(results_path(study, "01_pretrain"), {})  # notebook 01 finished
    with pytest.raises(RunError, match=r"steps: 20 in 01_pretrain, 30 given"):
        run_study(study, {"steps": 30}, resume=True)
    assert main(["study", "--resume", "--out", str(study), "-p", "lr", "0.01"]) == 2
    assert json.loads((study / "study.json").read_text())["params"] == {"steps": 20}  # untouched


def test_resume_takes_the_saved_parameters_whatever_the_scale_flags(tmp_path, monkeypatch, capsys):
    """--resume --smoke (or --scale) once rebuilt the parameters from the scale, dropping the -p's the study
    was started with: its unfinished notebooks ran with other values."""
    import bwssl_core.study

    study = tmp_path / "study"
    save_json(study / "study.json", {"params": {**SMOKE, "steps": 30, "cka_batch": 8},
                                     "notebooks": list(NOTEBOOK_ORDER)})
    calls = []
    monkeypatch.setattr(bwssl_core.study, "run_study", lambda out, params, notebooks, resume: calls.append(params))
    for flags in (["--smoke"], ["--scale", "smoke"], []):
        assert main(["study", "--resume", "--out", str(study), *flags, "-p", "lr", "0.01"]) == 0
        assert calls.pop() == {**SMOKE, "steps": 30, "cka_batch": 8, "lr": 0.01}
        assert ("--scale and --smoke are ignored" in capsys.readouterr().err) == bool(flags)


def test_resuming_some_notebooks_keeps_the_study_s_parameters_for_the_others(tmp_path, monkeypatch):
    """--resume --notebooks 03_patches of a study whose parameters include the sweep's: taken (they are the
    study's), a finished notebook outside the subset still guards its own, and study.json keeps them all."""
    import bwssl_core.study as study_module

    ran = []
    monkeypatch.setattr(study_module, "run_notebook", lambda name, out, params, failure=None: ran.append((name, params)))
    monkeypatch.setattr("bwssl_core.report.write_report", lambda out: out / "report.html")
    study = tmp_path / "study"
    params = {"steps": 20, "seeds": [1], "points": ["cpu:1"]}
    save_json(study / "study.json", {"params": params, "notebooks": list(NOTEBOOK_ORDER)})
    save_json(results_path(study, "01_pretrain"), {})  # notebook 01 finished
    run_study(study, params, ["03_patches"], resume=True)
    assert [name for name, _ in ran] == ["03_patches"] and "seeds" not in ran[0][1]
    assert json.loads((study / "study.json").read_text()) == {"params": params, "notebooks": list(NOTEBOOK_ORDER)}
    with pytest.raises(RunError, match=r"steps: 20 in 01_pretrain, 30 given"):
        run_study(study, {**params, "steps": 30}, ["03_patches"], resume=True)
    with pytest.raises(ConfigError, match="sweep seeds"):
        run_study(study, {**params, "seeds": [-1]}, ["03_patches"], resume=True)
    with pytest.raises(ConfigError, match="notebooks 05_extra: a study has 01_pretrain"):
        run_study(study, params, ["05_extra"], resume=True)
    assert len(ran) == 1


def test_a_notebook_opened_in_jupyterlab_works_from_the_repository_root(monkeypatch):
    """JupyterLab starts a kernel in notebooks/: the parameters cell moves it to the repository root, where
    `bwssl study` runs the notebooks, so the same relative paths name the same folders."""
    from bwssl_core.notebook import parameters

    monkeypatch.chdir(NOTEBOOKS)
    assert parameters({"steps": 5}, "01_pretrain")["steps"] == 5
    assert Path.cwd() == NOTEBOOKS.parent and (Path.cwd() / "notebooks" / "01_pretrain.py").is_file()


def test_a_notebook_run_again_in_its_kernel_passes_its_own_variables():
    """Cells run a second time in one kernel (JupyterLab) meet the first run's variables (P, dev, ...): only
    the parameters are checked then; in a fresh kernel (Papermill) a name the notebook does not take is
    still named, and a wrong type is refused either way."""
    from bwssl_core.notebook import parameters

    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) stpes"):
        parameters({"stpes": 5}, "01_pretrain")
    kernel = {"steps": 5}
    assert parameters(kernel, "01_pretrain")["steps"] == 5
    kernel.update(P={"steps": 5}, dev="cpu", summary={})  # what the first run left behind
    assert parameters(kernel, "01_pretrain")["steps"] == 5
    kernel["steps"] = "five"
    with pytest.raises(ConfigError, match="parameter steps='five' is a str"):
        parameters(kernel, "01_pretrain")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) P, dev, steps, summary"):  # another notebook's
        parameters({**kernel, "steps": 5}, "02_probe")


def test_notebook_results_of_other_parameters_are_never_replaced(tmp_path):
    from bwssl_core.study import check_results, save_results

    save_results(tmp_path, "02_probe", {"parameters": {"study": str(tmp_path), "runs": ["e2e", "bwssl-k2"]}, "x": 1})
    save_results(tmp_path, "02_probe", {"parameters": {"study": str(tmp_path), "runs": ("e2e", "bwssl-k2")}, "x": 2})
    assert json.loads(results_path(tmp_path, "02_probe").read_text())["x"] == 2  # the same parameters: a rerun
    with pytest.raises(RunError, match=r"02_probe.json holds results made with other parameters \(runs: .*new "
                                       r"`study` folder.*runs/e2e"):
        save_results(tmp_path, "02_probe", {"parameters": {"study": str(tmp_path), "runs": ["e2e"]}, "x": 3})
    assert json.loads(results_path(tmp_path, "02_probe").read_text())["x"] == 2
    with pytest.raises(RunError, match="other parameters"):  # what a notebook checks before any work
        check_results(tmp_path, "02_probe", {"study": str(tmp_path), "runs": ["e2e"]})
    assert check_results(tmp_path, "03_patches", {"runs": ["e2e"]}) == results_path(tmp_path, "03_patches")


def test_a_study_s_block_count_is_refused_without_a_flag_it_does_not_have():
    for params in ({"blocks": [1, 3]}, {"points": ["tiny:3"]}, {"depth": 6, "blocks": [1, 4]}):
        with pytest.raises(ConfigError, match="expected a divisor of depth=.*equal blocks: give block counts that "
                                              "divide it, or another depth") as err:
            check_study(params)
        assert "--partition" not in str(err.value)
