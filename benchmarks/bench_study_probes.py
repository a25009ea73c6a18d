"""The probes of a finished study, timed as notebook 02 runs them (issue 4: "on the CPU, the default
study's probes within a minute").

For every run the study probed, and once for the controls it shares with them (random init, raw
pixels): the frozen features of every layer (timed apart: they are the forward passes, not the
probes), then the linear probes with retrieval of every pooling and family (evaluate.probe_layers),
then the attentive probe on the notebook's layers and families. Nothing is read from or written to the
feature cache. Prints one table and saves JSON.

    python benchmarks/bench_study_probes.py --study runs/study-20261126-120000 --out runs/study_probes.json
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import time
from pathlib import Path

import torch

from bwssl_core.attentive import attentive_probe
from bwssl_core.evaluate import depthwise, load_split, probe_layers, random_init
from bwssl_core.io import save_json
from bwssl_core.notebook import defaults
from bwssl_core.probe import feature_precision, layer_features, pixel_features, pixel_tokens
from bwssl_core.study import notebook_params, run_paths
from bwssl_core.timing import add_device_args, device_from_args, device_name, sync
from bwssl_core.train import load_run


def study_parameters(study: Path) -> dict:
    """Notebook 02's parameters in `study`: its defaults with what study.json set over them."""
    given = json.loads((study / "study.json").read_text())["params"]
    return {**defaults("02_probe"), **notebook_params(given, "02_probe")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", required=True, help="a study folder that `bwssl study` filled")
    p.add_argument("--out", required=True, help="JSON file of the results")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    add_device_args(p)
    args = p.parse_args(argv)
    device, study = device_from_args(args), Path(args.study)
    par = study_parameters(study)
    runs = {name: load_run(path, device) for name, path in run_paths(study, par["runs"]).items()}  # names or paths
    first, config = next(iter(runs.values()))
    cfg, seed = first.cfg, config["train"]["seed"]
    models = {**{name: model for name, (model, _) in runs.items()}, "random_init": random_init(cfg, seed),
              "pixels": None}
    (train_clips, train_y), (val_clips, val_y) = (load_split(par["data"], s, cfg) for s in ("train", "val"))
    families = par["families"] or list(train_y)
    att_families = par["attentive_families"] or families
    token_layers = list(par["attentive_layers"])
    precision = feature_precision(device, args.precision)
    ks = tuple(k for k in inspect.signature(depthwise).parameters["ks"].default if k <= len(train_clips))  # as it does

    rows = {}
    for name, net in models.items():
        tic = time.perf_counter()
        feats, tokens = {}, {}
        for split, clips in (("train", train_clips), ("val", val_clips)):
            if net is None:
                feats[split] = pixel_features(clips, cfg.tubelet_size, cfg.patch_size, cfg.grid, par["poolings"])
                tokens[split] = pixel_tokens(clips, cfg.tubelet_size, cfg.patch_size) if token_layers else None
            else:
                feats[split], tokens[split] = layer_features(net, clips, par["poolings"], device=device,
                                                             token_layers=token_layers, precision=precision)
        sync(device)
        features_s, tic = time.perf_counter() - tic, time.perf_counter()
        linear = probe_layers(feats["train"], train_y, feats["val"], val_y, families, seed, ks, device)
        sync(device)
        linear_s, tic = time.perf_counter() - tic, time.perf_counter()
        attentive = {fam: [attentive_probe(tokens["train"][i], train_y[fam], tokens["val"][i], val_y[fam], seed=seed,
                                           device=device, precision=precision)["acc"]
                           for i in range(len(tokens["train"]))] for fam in (att_families if token_layers else [])}
        sync(device)
        rows[name] = {"features_s": features_s, "linear_s": linear_s, "attentive_s": time.perf_counter() - tic,
                      "best_acc": {pool: {f: max(r[f]["acc"]) for f in r} for pool, r in linear.items()},
                      "attentive_acc": attentive}
        print(f"{name}: features {features_s:.1f} s, linear probes and retrieval {linear_s:.1f} s, "
              f"attentive {rows[name]['attentive_s']:.1f} s", flush=True)

    total = {k: sum(r[k] for r in rows.values()) for k in ("features_s", "linear_s", "attentive_s")}
    print(f"\n{'model':12} {'features s':>10} {'linear s':>9} {'attentive s':>11} {'probes s':>9}")
    for name, r in {**rows, "all": total}.items():
        print(f"{name:12} {r['features_s']:10.1f} {r['linear_s']:9.1f} {r['attentive_s']:11.1f} "
              f"{r['linear_s'] + r['attentive_s']:9.1f}")
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": device_name(device),
           "threads": torch.get_num_threads(), "precision": precision}
    result = {"env": env, "args": vars(args), "parameters": par, "clips": [len(train_clips), len(val_clips)],
              "models": rows, **total, "probes_s": total["linear_s"] + total["attentive_s"]}
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
