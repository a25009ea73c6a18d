# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %%

# %% [markdown]
# # 04 Sweep: model sizes and partition granularities
#
# Each point (preset, K blocks) is a Papermill run of notebooks 01 and 02 with its own parameters,
# in `<study>/sweep/<preset>/`; training parameters are those of the study's notebook 01 (its `depth`
# for points of its preset only: another preset keeps its own). Runs the
# main study already trained with the same parameters are linked in, not trained again, and a preset
# whose runs notebook 02 has all probed takes its results as they are. With `seeds`, every point is
# trained and probed again under each further seed (`<study>/sweep/<preset>-seed<s>/`): a seed draws
# the starting weights, the masks and the clip order, so the spread over seeds says how much of a
# lead another draw alone moves. The points' final tables are gathered into one table and plot.

# %%
import json

import plotly.io as pio

from bwssl_core import figures, notebook, viz
from bwssl_core.figures import html_table
from bwssl_core.study import check_results, main_probe, point_folder, results_path, run_dir, run_name, run_notebook, \
    save_results, sweep_points, sweep_seeds
from IPython.display import HTML, display

# %% tags=["parameters"]
study = "runs/study-demo"  # the study folder; notebook 01 must have run there (its parameters are reused)
points = ["cpu:1", "cpu:2", "tiny:1", "tiny:2", "tiny:4"]  # "preset:K", K blocks (1 is E2E)
seeds = []  # further training seeds for every point, beside notebook 01's (empty: that one alone)
poolings = ["mean", "slices"]  # poolings probed at each point the main study (notebook 02) has not probed
families = []  # label families; empty: all
cka_batch = 50  # clips per minibatch-CKA batch
device = "auto"

# %%
P = notebook.parameters(globals(), "04_sweep")
check_results(study, "04_sweep", P)  # results of other parameters there: refused before any work
pio.renderers.default = viz.static_renderer()
main = json.loads(results_path(study, "01_pretrain").read_text())["parameters"]
by_preset = sweep_points(points)
all_seeds = sweep_seeds(seeds, main["seed"])
print("points", by_preset, "seeds", all_seeds, "training parameters from notebook 01:", main)

# %% [markdown]
# ## Run every point

# %%
results = {}  # (preset, seed) -> its 02_probe results
for seed in all_seeds:
    main_seed = seed == main["seed"]
    for preset, ks in by_preset.items():
        names = [run_name(k) for k in sorted(ks)]
        results[preset, seed] = main_probe(study, names) if main_seed and preset == main["preset"] else None
        if results[preset, seed] is not None:
            print(preset, "probed in the main study:", names)
            continue
        reuse = [n for n in names if main_seed and preset == main["preset"] and run_dir(study, n).exists()]
        folder = point_folder(study, preset, reuse, None if main_seed else seed)
        for made in ("01_pretrain", "02_probe"):  # this sweep's own: made again with its parameters (a -p on
            results_path(folder, made).unlink(missing_ok=True)  # --resume); training and features are kept
        run_notebook("01_pretrain", folder / "01_pretrain.ipynb",
                     {**main, "study": str(folder), "preset": preset, "blocks": sorted(ks), "seed": seed,
                      "depth": main.get("depth", 0) if preset == main["preset"] else 0,  # another preset: its own
                      "device": device, "recon_clips": 0},
                     failure=folder / "FAILED.json")  # notebook 01's parameters, but these
        run_notebook("02_probe", folder / "02_probe.ipynb",
                     {"study": str(folder), "data": main["data"], "runs": names, "reference": names[0],
                      "families": families, "poolings": poolings, "attentive_layers": [], "cka_batch": cka_batch,
                      "device": device},
                     failure=folder / "FAILED.json")
        results[preset, seed] = results_path(folder, "02_probe")
        print(preset, "seed", seed, "done:", names)

# %% [markdown]
# ## Gathered: last-layer linear probe (mean pooling) by preset and K
#
# Every row is one model at the last layer with mean pooling (notebook 02's final table), both controls
# of each preset's architecture included; `vs random init` is a run's lead over the random-init control
# and `vs E2E` its lead over the E2E run of its preset, on the same family and seed. With several seeds
# each value is the mean over seeds and `sd` its standard deviation.

# %%
rows, best_rows = [], []
for (preset, seed), path in results.items():
    res, blocks = json.loads(path.read_text()), {run_name(k): k for k in by_preset[preset]}
    rows += figures.sweep_rows(res["table"], preset, blocks, seed)
    best_rows += figures.sweep_best_rows(res["best_layers"], preset, blocks, seed)
summary = figures.seed_summary(rows)
display(HTML(html_table(summary)))

# %%
figures.sweep_figure(summary).show()

# %% [markdown]
# ## Gathered: best layer per family and pooling
#
# The last layer with mean pooling can miss what a run learned (on the CPU study motion shows in the
# temporal slices, at the best layer): every run's and control's best-layer top-1 for each family and
# pooling (the layer chosen on held-out training clips), with the same leads, over the seeds. (The main
# study's poolings and its attentive probe appear with its seed alone: `seeds` says how many seeds a row
# averages.)

# %%
best_summary = figures.seed_summary(best_rows)
display(HTML(html_table(best_summary)))

# %%
save_results(study, "04_sweep", {"notebook": "04_sweep", "parameters": P, "seeds": all_seeds,
                                 "rows": rows, "summary": summary, "best_rows": best_rows,
                                 "best_summary": best_summary})
