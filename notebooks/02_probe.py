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
# # 02 Depth-wise probing: what each layer of E2E and BWSSL encoders makes decodable
#
# For every run of the study and every encoder layer: a linear probe (multinomial logistic
# regression, l2 chosen on a held-out part of the training split) and retrieval (validation clips
# query the training gallery, R@k) for every label family, under three poolings of the tokens; a
# token-level attentive probe on chosen layers; CKA within and across runs; how much each layer
# changes its input. Every curve has its controls: the same architecture at random initialisation
# and raw pixels. Features and probe results are cached under `<study>/features/` by content.
#
# Besides the study's runs, `runs` takes any run folder by its path, such as official or HF VideoMAE
# weights that `bwssl import` wrote: each run reads the same videos at its own clip size. The tables'
# controls are the reference run's architecture; each run's gain over random init is over its own. The
# claims compare the blockwise runs with the reference; other one-block runs are probed, not claimed about.

# %%
import time
from pathlib import Path

import plotly.io as pio

from bwssl_core import claims, figures, notebook, viz
from bwssl_core.analyze import analyze
from bwssl_core.config import ConfigError
from bwssl_core.evaluate import clip_shape, depthwise, load_split, random_init
from bwssl_core.figures import (attentive_curve_figure, attentive_rows, best_gain, best_layers, change_figure,
                                 cka_figure, final_table, html_table, probe_figure)
from bwssl_core.study import check_poolings, check_results, run_paths, save_results
from bwssl_core.train import load_run, resolve_device
from IPython.display import HTML, display

# %% tags=["parameters"]
study = "runs/study-demo"  # the study folder: runs/<name>/ inside
data = "data/synth"  # data folder with train.csv, val.csv (and metadata.csv: every label family)
runs = ["e2e", "bwssl-k2"]  # run names under <study>/runs/, or paths of other run folders (`bwssl import`)
reference = "e2e"  # the run the final table's gaps are measured against (a path's run: its folder's name)
families = []  # label families to probe; empty: all the data has
poolings = ["mean", "slices", "grid"]  # mean (the paper's standard), temporal slices, space-time grid
attentive_layers = [-1]  # layers for the token-level attentive probe; empty: none
attentive_families = ["motion"]  # families for the attentive probe; empty: all
cka_batch = 50  # clips per minibatch-CKA batch
device = "auto"  # "auto": the local GPU if any, else the CPU

# %%
P = notebook.parameters(globals(), "02_probe")
check_results(study, "02_probe", P)  # results of other parameters there: refused before any work
check_poolings(poolings)
pio.renderers.default = viz.static_renderer()
dev = str(resolve_device(None if device == "auto" else device))
paths = run_paths(study, runs)
models = {name: load_run(path, dev) for name, path in paths.items()}
reference = reference if reference in models else Path(reference).name  # a path's run: its folder's name
if reference not in models:  # the tables' gaps, CKA across and the claims are measured against it
    raise ConfigError(f"reference={reference!r}: not one of the runs {list(models)}")
splits = {}  # clip shape (frames, pixels) -> (train, val): the same videos, read at each run's own size
for model, _ in models.values():
    if clip_shape(model.cfg) not in splits:
        splits[clip_shape(model.cfg)] = tuple(load_split(data, split, model.cfg) for split in ("train", "val"))
        train, val = splits[clip_shape(model.cfg)]
        print(clip_shape(model.cfg), "train", tuple(train[0].shape), "validation", tuple(val[0].shape),
              "families", list(train[1]))
clips = {name: splits[clip_shape(model.cfg)] for name, (model, _) in models.items()}  # name -> (train, val)
val = clips[reference][1]

# %% [markdown]
# ## Linear probe and retrieval, layer by layer

# %%
probe, seconds = {}, {}
for name, (model, config) in models.items():
    tic = time.perf_counter()
    probe[name] = depthwise(model, *clips[name], families or None, poolings, seed=config["train"]["seed"],
                            device=dev, cache=f"{study}/features", attentive_layers=attentive_layers,
                            attentive_families=attentive_families or None,
                            meta={"run": name, "config": config, "data": data,
                                  "checkpoint": str(paths[name] / "checkpoint.pt")})
    seconds[name] = time.perf_counter() - tic
    print(f"{name}: {seconds[name]:.1f} s")

# %%
for pooling in poolings:
    probe_figure(probe, pooling).show()
probe_figure(probe, "mean", "R@1").show()

# %% [markdown]
# ## Token-level (attentive) probe
# Pooled metrics can miss what tokens carry about where and when. Each probe keeps the epoch of its
# budget that scored best on held-out training clips; the curves show whether it had levelled off.

# %%
display(HTML(html_table(attentive_rows(probe))))
if attentive_layers:
    attentive_curve_figure(probe).show()

# %% [markdown]
# ## Similarity and change across depth
# Minibatch CKA (unbiased HSIC) of mean-pooled features between layers, within each run and
# against the reference run; relative change, CKA and kNN overlap between consecutive layers. The
# random-init encoder (the reference's starting weights, as the probes' control) is measured alike,
# and against the reference; raw pixels have no depth, so no curve.

# %%
ref_model = models[reference][0]
analysis = {}
for name, (model, _) in models.items():
    other = ref_model if name != reference else None
    analysis[name] = analyze(model, clips[name][1][0], other, batch_size=cka_batch, attention_clips=0, device=dev,
                             other_clips=val[0])  # attention: notebook 03
    cka_figure(analysis[name]["cka_within"], f"CKA within {name}").show()
    if other is not None:
        cka_figure(analysis[name]["cka_across"], f"CKA across: {name} (rows) vs {reference} (columns)",
                   rows=f"{name} layer", cols=f"{reference} layer").show()
control = figures.CONTROLS["random_init"]
analysis[control] = analyze(random_init(ref_model.cfg, models[reference][1]["train"]["seed"]), val[0], ref_model,
                            batch_size=cka_batch, attention_clips=0, device=dev)
cka_figure(analysis[control]["cka_across"], f"CKA across: {control} (rows) vs {reference} (columns)",
           rows=f"{control} layer", cols=f"{reference} layer").show()
change_figure(analysis).show()

# %% [markdown]
# ## The final table
# Linear probe and R@1 at the last layer, mean pooling, with the gap to the reference run; then each run's
# best gain over random init, and every family and pooling's best layer against both controls (each layer
# chosen on the held-out part of the training clips, then scored on validation: chosen on validation, the
# best of several equally good layers reads about one standard error high).

# %%
table = final_table(probe, "mean", reference)
gains = {name: best_gain(res) for name, res in probe.items()}
layers = best_layers(probe, reference)  # each family and pooling: every run's best layer against both controls
display(HTML(html_table(table)))
display(HTML(html_table([{"run": n, **g} for n, g in gains.items()])))
display(HTML(html_table(layers)))

# %% [markdown]
# ## The paper's claims on this data
# Each claim, the measure that tests it here, and what the numbers say, run by run against the reference
# (`bwssl_core.claims`). A probe difference counts only beyond twice the validation clips' sampling error: the
# noise of the clips, not of training (notebook 04's seeds measure that); the change measures give a direction
# only. Claim 4's attention comes from notebook 03: the report has it.

# %%
blocks = {name: len(model.cfg.partition) for name, (model, _) in models.items()}
said = claims.summary(probe, analysis, reference, len(val[0]), blocks=blocks)  # None: nothing to compare
if said:
    display(HTML(html_table(said["lines"], text=True)))
    for key, title in claims.TABLES.items():
        display(HTML(f"<h4>{title}</h4>" + html_table(said[key])))

# %%
save_results(study, "02_probe", {"notebook": "02_probe", "parameters": P, "poolings": poolings,
                                 "val_clips": len(val[0]), "reference": reference, "blocks": blocks,
                                 "probe": probe, "analysis": analysis, "table": table, "best_gain": gains,
                                 "best_layers": layers, "seconds": seconds})
