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

# %% [markdown]
# # 03 Patches: attention, patch influence and reconstructions, E2E against BWSSL
#
# One clip of the data split, through each run of the study (or any run folder of the same clip size,
# given by its path). The live panel (JupyterLab) scrubs attention maps by run, block, layer, head,
# frame and query patch; the static figures below it are what survives in the saved notebook.
# Attention is measured over all tokens of the clip (no mask), and the figures by layer average it
# over the first `attention_clips` clips of the split; reconstructions use one fixed tube mask, the
# same for every run.

# %%
import plotly.io as pio
import torch

from bwssl_core import figures, notebook, viz
from bwssl_core.config import ConfigError
from bwssl_core.evaluate import clip_shape, load_split, random_init
from bwssl_core.study import check_results, run_paths, save_results
from bwssl_core.train import load_run, resolve_device

# %% tags=["parameters"]
study = "runs/study-demo"  # the study folder (bwssl study): runs/<name>/ inside
data = "data/synth"  # data folder with <split>.csv
runs = ["e2e", "bwssl-k2"]  # run names under <study>/runs/, or paths of other run folders (`bwssl import`)
clip = 0  # index of the clip in the split
attention_clips = 16  # the first clips of the split whose attention the figures by layer average
split = "val"
device = "auto"  # "auto": the local GPU if any, else the CPU
influence_method = "gradient"  # "gradient" (Jacobian norm per tube) or "occlusion" (one forward per tube)
mask_seed = 0  # seed of the tube mask for the reconstructions

# %%
P = notebook.parameters(globals(), "03_patches")
check_results(study, "03_patches", P)  # results of other parameters there: refused before any work
pio.renderers.default = viz.static_renderer()
dev = str(resolve_device(None if device == "auto" else device))
torch.manual_seed(0)

# %% [markdown]
# ## Models and clip

# %%
models, configs = {}, {}
for name, path in run_paths(study, runs).items():
    models[name], configs[name] = load_run(path, dev)
first, cfg = next(iter(models)), next(iter(models.values())).cfg
for name, model in models.items():  # one clip, one mask and one panel: every run must share the token grid
    if (clip_shape(model.cfg), model.cfg.grid) != (clip_shape(cfg), cfg.grid):
        raise ConfigError(f"runs: {name} reads {clip_shape(model.cfg)} (frames, pixels) clips into a "
                          f"{model.cfg.grid} token grid, {first} {clip_shape(cfg)} into {cfg.grid}: notebook 03 "
                          "shows runs of one clip size side by side (run it once per size; notebook 02 takes both)")
video, labels = load_split(data, split, cfg)
x = video[clip]  # uint8 (C, T, H, W)
mask = models[first].random_mask(1, torch.Generator(device=dev).manual_seed(mask_seed))
partitions = {name: m.cfg.partition for name, m in models.items()}
many = video[:attention_clips]  # uint8 (N, C, T, H, W): the figures by layer average their attention
diagnostics = {name: viz.run_diagnostics(m, x, mask, influence_method, many) for name, m in models.items()}
print({name: list(p) for name, p in partitions.items()}, "clip", clip, {k: int(v[clip]) for k, v in labels.items()})

# %% [markdown]
# ## Attention panel (live in JupyterLab)
#
# The heat map is the query patch's attention (cyan box) to the tokens of the shown frame's tube
# slice. Click the map to move the query; a dotted box means the query sits in another slice.

# %%
if "panel" in globals():
    panel.close()  # a re-run of this cell: let the previous panel's maps go
panel = viz.AttentionPanel({n: d["attn"] for n, d in diagnostics.items()}, partitions, x, cfg)
panel.widget

# %% [markdown]
# The same maps, static (the saved notebook keeps no widget): the query patch's attention (cyan box; mean
# over heads) at each layer where a block of any run ends, then the attention rollout (Abnar & Zuidema 2020)
# from the input through that layer: where what reaches the query by then came from.

# %%
ends = viz.block_ends(partitions)  # the same layers for every run
for name, d in diagnostics.items():
    viz.attention_figure(d["attn"], x, cfg, name, ends).show()

# %% [markdown]
# ## Attention by layer
#
# Mean attention distance (space in pixels, time in frames), token mixing and attention entropy,
# one line per run. Dashed lines mark the boundaries of BWSSL blocks: is there a jump there? Two
# references: dotted, what uniform attention over all tokens gives (a layer at that level does not
# favour near tokens, however large its distances or its share of other time slices look; its
# entropy says whether it favours particular tokens at all), and grey dashed, the same encoder at
# random initialisation (the first run's seed), measured on the same clips.

# %%
summaries = {n: d["layers"] for n, d in diagnostics.items()}
control = figures.CONTROLS["random_init"]
summaries[control] = viz.control_layers(random_init(cfg, configs[first]["train"]["seed"]).to(dev), many)
uniform = viz.uniform_attention(cfg)  # the chance level: what attention spread over all tokens gives
viz.distance_figure(summaries, partitions, uniform)

# %%
viz.mixing_figure(summaries, uniform)

# %%
viz.entropy_figure(summaries, partitions, uniform)

# %% [markdown]
# Which tokens, then? The share of attention that goes to the tubes where the clip moves most (the
# 10% with the largest frame differences): above the dotted line a layer seeks out motion.

# %%
viz.moving_figure(summaries, partitions, uniform)

# %% [markdown]
# ## Patch influence on each block's pooled representation

# %%
for name, d in diagnostics.items():
    viz.influence_figure(d["influence"], x, cfg, name, influence_method).show()

# %% [markdown]
# ## Each block's reconstruction and its error per tube
#
# With per-tube normalised targets the shown pixels carry the ground truth's per-patch mean and
# std (the title says so): judge the error maps, not how natural the images look.

# %%
for name, d in diagnostics.items():
    viz.reconstruction_figure(d["reconstructions"], x, mask, cfg, name).show()

# %% [markdown]
# ## Results

# %%
out = save_results(study, "03_patches", {
    "notebook": "03_patches", "parameters": P, "attention_clips": len(many), "uniform_attention": uniform,
    "controls": {"random_init": viz.layer_results(summaries[control])},
    "runs": viz.results(diagnostics, partitions, influence_method)})
print("wrote", out)
