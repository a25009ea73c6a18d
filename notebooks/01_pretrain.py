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
# # 01 Pretraining: E2E and blockwise (BWSSL) VideoMAE
#
# Builds the data set if it is missing, then pretrains the same encoder end-to-end (one block) and
# blockwise at each partition granularity in `blocks`: each block has its own decoder and its own
# masked-reconstruction loss, and no gradient crosses a block boundary. Every run is saved under
# `<study>/runs/<name>/`; rerunning keeps finished runs and resumes unfinished ones.

# %%

import plotly.io as pio
import torch

from bwssl_core import model_config, notebook, viz
from bwssl_core.batches import normalize_video
from bwssl_core.evaluate import load_split
from bwssl_core.figures import loss_figure
from bwssl_core.patches import reconstructions
from bwssl_core.study import check_results, metrics, run_configs, run_dir, run_name, save_results, train_run
from bwssl_core.synth import SynthConfig, ensure_dataset
from bwssl_core.train import load_run, resolve_device

# %% tags=["parameters"]
study = "runs/study-demo"  # the study folder: runs/<name>/ and results/ inside
data = "data/synth"  # data folder with train.csv / val.csv; made by the synthetic generator if missing
n_train = 2000  # clips the generator makes when `data` is missing
n_val = 500
synth_size = 64  # frame size of generated clips
data_format = "mp4"  # how generated clips are stored: "mp4" (list files, decoded with decord) or "tensor"
preset = "cpu"  # model size: cpu (2-core CPU), tiny (tests), vit_s, vit_b, ... (GPU)
depth = 0  # encoder layers; 0: the preset's (every K in `blocks` must divide it)
blocks = [1, 2]  # partition granularities: 1 is E2E, K > 1 is BWSSL with K equal blocks
steps = 1600  # optimiser steps per run
batch_size = 16  # clips per step (at CPU scale more, smaller steps learn more per second: NOTES.md)
lr = 1e-3  # peak learning rate (after warmup)
min_lr = 1e-5  # learning rate at the end of the cosine schedule
warmup_steps = 160
plain_target = True  # plain-pixel target (learns faster at CPU scale) instead of VideoMAE's normalised one
mask_ratio = 0.9
dec_keep = 1.0  # fraction of the hidden tubes each decoder reconstructs (VideoMAE V2's decoder masking)
dec_depth = 0  # decoder layers per block; 0: the preset's (deeper ones left motion below random init: NOTES.md)
torch_compile = False  # torch.compile each block and decoder (small models' eager GPU steps are launch-bound: NOTES.md)
seed = 0
device = "auto"  # "auto": the local GPU if any, else the CPU
recon_clips = 1  # validation clips whose per-block reconstructions are drawn

# %%
P = notebook.parameters(globals(), "01_pretrain")
check_results(study, "01_pretrain", P)  # results of other parameters there: refused before any work
pio.renderers.default = viz.static_renderer()
dev = str(resolve_device(None if device == "auto" else device))
print(P, "device", dev)

# %% [markdown]
# ## Data
# The default is the embedded synthetic set (`bwssl synth`): labelled motion, shape, colour, speed
# and position, with nuisances varied independently (benchmarks/NOTES.md, "Learnability of the default data set").

# %%
ensure_dataset(data, n_train, n_val, SynthConfig(size=synth_size), fmt=data_format, device=dev)  # made if missing
cfg0 = model_config(preset, mask_ratio=mask_ratio, norm_target=not plain_target)
clips, _ = load_split(data, "train", cfg0)
val_clips, _ = load_split(data, "val", cfg0)
print("train clips", tuple(clips.shape), "validation clips", tuple(val_clips.shape))

# %% [markdown]
# ## Pretraining
# The same seed gives every run the same starting encoder, the same clip order and the same masks.

# %%
summary = {}
for k in blocks:
    name = run_name(k)
    mcfg, tcfg = run_configs(P, k)  # lr and min_lr are per batch here, per 256 clips in TrainConfig
    last = train_run(run_dir(study, name), mcfg, tcfg, clips, dev, extra={"data": data, "preset": preset})
    rows = metrics(run_dir(study, name))
    summary[name] = {"blocks": k, "partition": list(mcfg.partition), "steps": last["step"],
                     "loss": last["loss"], "clips_per_s": rows[-1]["clips_per_s"]}
    print(name, summary[name])

# %% [markdown]
# ## Loss of each block
# A BWSSL block's decoder reconstructs the hidden tubes from that block's output alone.

# %%
loss_figure({name: metrics(run_dir(study, name)) for name in summary}).show()

# %% [markdown]
# ## Each block's reconstruction of the same clips
# The same tube mask for every run; the error map is per hidden tube.

# %%
mask = None
for name in summary:
    model, _ = load_run(run_dir(study, name), dev)
    if mask is None:
        mask = model.random_mask(1, torch.Generator(device=dev).manual_seed(seed))
    for i in range(recon_clips):
        video = normalize_video(val_clips[i:i + 1].to(dev))
        recs = reconstructions(model, video, mask)
        summary[name].setdefault("recon_error", []).append(
            [float(r["error"].nanmean()) for r in recs])
        viz.reconstruction_figure([{k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()} for r in recs],
                                  val_clips[i], mask, model.cfg, name).show()

# %%
save_results(study, "01_pretrain", {"notebook": "01_pretrain", "parameters": P, "runs": summary})
