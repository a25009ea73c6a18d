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
# in `<study>/sweep/<preset>/`; training parameters are those of the study's notebook 01. Runs the
# main study already trained with the same parameters are linked in, not trained again, and a preset
# whose runs notebook 02 has all probed takes its results as they are. The points' final tables are
# gathered into one table and plot.

# %%
import json

import plotly.io as pio
from plotly.subplots import make_subplots

from bwssl_core import figures, notebook, viz
from bwssl_core.figures import html_table
from bwssl_core.io import save_json
from bwssl_core.study import main_probe, point_folder, results_path, run_dir, run_name, run_notebook, sweep_points
from IPython.display import HTML, display

# %% tags=["parameters"]
study = "runs/study-demo"  # the study folder; notebook 01 must have run there (its parameters are reused)
points = ["cpu:1", "cpu:2", "tiny:1", "tiny:2", "tiny:4"]  # "preset:K", K blocks (1 is E2E)
poolings = ["mean", "slices"]  # poolings probed at each point the main study (notebook 02) has not probed
families = []  # label families; empty: all
cka_batch = 50  # clips per minibatch-CKA batch
device = "auto"

# %%
P = notebook.parameters(globals(), "04_sweep")
pio.renderers.default = viz.static_renderer()
main = json.loads(results_path(study, "01_pretrain").read_text())["parameters"]
by_preset = sweep_points(points)
print("points", by_preset, "training parameters from notebook 01:", main)

# %% [markdown]
# ## Run every point

# %%
results = {}  # preset -> its 02_probe results
for preset, ks in by_preset.items():
    names = [run_name(k) for k in sorted(ks)]
    results[preset] = main_probe(study, names) if preset == main["preset"] else None
    if results[preset] is not None:
        print(preset, "probed in the main study:", names)
        continue
    reuse = [n for n in names if preset == main["preset"] and run_dir(study, n).exists()]
    folder = point_folder(study, preset, reuse)
    run_notebook("01_pretrain", folder / "01_pretrain.ipynb",
                 {**main, "study": str(folder), "preset": preset, "blocks": sorted(ks), "device": device,
                  "recon_clips": 0}, failure=folder / "FAILED.json")  # notebook 01's parameters, but these
    run_notebook("02_probe", folder / "02_probe.ipynb",
                 {"study": str(folder), "data": main["data"], "runs": names, "reference": names[0],
                  "families": families, "poolings": poolings, "attentive_layers": [], "cka_batch": cka_batch,
                  "device": device},
                 failure=folder / "FAILED.json")
    results[preset] = results_path(folder, "02_probe")
    print(preset, "done:", names)

# %% [markdown]
# ## Gathered: last-layer linear probe (mean pooling) by preset and K
#
# Every row is one model at the last layer with mean pooling (notebook 02's final table), both controls
# of each preset's architecture included; `vs random init` is a run's lead over the random-init control
# on the same family, pooling and layer.

# %%
rows = []
for preset, ks in by_preset.items():
    res = json.loads(results[preset].read_text())
    kind = {run_name(k): k for k in ks}
    chance = {r["family"]: r["linear"] for r in res["table"] if r["model"] == figures.CONTROLS["random_init"]}
    for r in res["table"]:
        if r["model"] in kind or r["model"] in figures.CONTROLS.values():
            rows.append({"preset": preset, "model": r["model"], "blocks": kind.get(r["model"], ""),
                         "family": r["family"], "linear": r["linear"], "R@1": r["R@1"],
                         "vs random init": r["linear"] - chance[r["family"]] if r["model"] in kind else ""})
display(HTML(html_table(rows)))

# %%
fams = sorted({r["family"] for r in rows})
fig = make_subplots(rows=1, cols=len(fams), subplot_titles=fams, shared_yaxes=True)
for i, preset in enumerate(by_preset):
    colour = figures.COLOURS[i % len(figures.COLOURS)]
    for col, fam in enumerate(fams, start=1):
        mine = [r for r in rows if r["preset"] == preset and r["family"] == fam]
        pts = sorted((r["blocks"], r["linear"]) for r in mine if r["blocks"] != "")
        fig.add_scatter(x=[k for k, _ in pts], y=[a for _, a in pts], mode="lines+markers", name=preset,
                        line_color=colour, legendgroup=preset, showlegend=col == 1, row=1, col=col)
        for r in (r for r in mine if r["blocks"] == ""):  # the controls, as levels across K
            dash = "dash" if r["model"] == figures.CONTROLS["random_init"] else "dot"
            fig.add_scatter(x=[pts[0][0], pts[-1][0]], y=[r["linear"]] * 2, mode="lines", line=dict(color=colour,
                            dash=dash), name=f"{preset} {r['model']}", legendgroup=preset, showlegend=col == 1,
                            row=1, col=col)
fig.update_xaxes(title_text="K (1 = E2E)", type="log")
fig.update_yaxes(title_text="top-1", row=1, col=1)
fig.update_layout(title="Last-layer linear probe (mean pooling) against the number of blocks K<br>"
                        "<sup>dashed: random init, dotted: raw pixels, each preset's</sup>", height=380)
fig.show()

# %%
save_json(results_path(study, "04_sweep"), {"notebook": "04_sweep", "parameters": P, "rows": rows})
