"""The study's HTML report: key figures and tables from the notebooks' results, one self-contained
file (plotly.js inlined once, so it opens offline)."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from . import claims, figures, viz
from .io import RunError, save_text
from .study import NOTEBOOK_ORDER, metrics, point_path, results_path, run_dir

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table.results{border-collapse:collapse;margin:1em 0}table.results td,table.results th{border:1px solid #ccc;
padding:3px 8px;text-align:right}table.results th{background:#f3f3f3}
table.text td,table.text th{text-align:left}h2{border-bottom:1px solid #ddd}"""


def _load(study: Path, name: str) -> dict | None:
    path = results_path(study, name)
    return json.loads(path.read_text()) if path.exists() else None


def _claims(study: Path, probe: dict, patches: dict | None, pre: dict | None, sweep: dict | None) -> dict | None:
    """claims.summary from notebook 02's results, with notebook 03's attention rows and the sweep's seeds of the
    main study's preset where the study has them."""
    n = probe.get("val_clips") or next((a["clips"] for a in probe.get("analysis", {}).values()), None)
    if n is None or not probe.get("analysis"):
        return None  # results of an older study: no clip count to judge the noise by
    attention, uniform = None, None
    if patches:
        attention = {name: r["layers"] for name, r in patches["runs"].items()}
        attention.update({figures.CONTROLS[k]: rows for k, rows in patches.get("controls", {}).items()})
        uniform = patches.get("uniform_attention")
    main = (pre or {}).get("parameters", {})  # notebook 01's: the preset and seed of the study's own runs
    preset = main.get("preset")
    seeds = [r for r in (sweep or {}).get("best_rows", []) if r["preset"] == preset]
    said = claims.summary(probe["probe"], probe["analysis"], probe["reference"], n, attention, uniform, seeds,
                          probe.get("blocks"))
    # each seed's summary, from its sweep point; the main seed's point, where the sweep made one, holds the study's
    # runs (linked in) and those the sweep trained beside them, probed as the other seeds' were
    own, per_seed = main.get("seed", 0), {}
    for seed in (sweep or {}).get("seeds", []):
        other = _load(point_path(study, preset, None if seed == own else seed), "02_probe")
        if other and other.get("analysis") and _one_block(other):
            per_seed[seed] = claims.summary(other["probe"], other["analysis"], other["reference"], n,
                                            blocks=other.get("blocks"))
        elif seed == own:
            per_seed[seed] = said
    if said and len(per_seed) > 1 and all(per_seed.values()):
        said["lines"] = sorted(said["lines"] + claims.over_seeds(per_seed), key=lambda line: line["claim"][:2])
    return said


def _one_block(probe: dict) -> bool:
    """Whether notebook 02's reference run is E2E (one block): a sweep point without K = 1 measures against
    its smallest K, which the claims would call E2E. Results from before `blocks` was saved: by name."""
    return probe.get("blocks", {}).get(probe["reference"], 1 if probe["reference"] == "e2e" else 0) == 1


def write_report(study: str | Path) -> Path:
    """study/report.html from whatever results the study has; the final table is required."""
    return write(study)[0]


def chosen_note(rows: list[dict]) -> str:
    """How a table's best layers were chosen: on held-out training clips and scored on validation (its `layer
    chosen on` column says so row by row), or, results made before that column, on validation itself."""
    if rows and "layer chosen on" not in rows[0]:
        return "<p>Best layers chosen on validation, the clips that score them (results made before layers were " \
            "chosen on held-out training clips): a best layer reads high.</p>"
    return "<p>Each best layer is chosen on the held-out part of the training clips, then scored on validation.</p>"


def write(study: str | Path) -> tuple[Path, dict | None]:
    """write_report, also returning the claims it shows (claims.summary; None where there are none)."""
    study = Path(study)
    probe = _load(study, "02_probe")
    if probe is None:
        raise RunError(f"{results_path(study, '02_probe')}: no probe results, so no final table to report")
    parts, first = [], True

    def fig(f):  # plotly.js inlined with the first figure only
        nonlocal first
        parts.append(f.to_html(full_html=False, include_plotlyjs=first))
        first = False

    params = json.loads((study / "study.json").read_text()) if (study / "study.json").exists() else {}
    parts.append(f"<h1>BWSSL study: {html.escape(study.name)}</h1><p>Written {time.strftime('%Y-%m-%d %H:%M')}. "
                 f"Parameters: <code>{html.escape(json.dumps(params.get('params', {})))}</code> over the notebooks' "
                 "defaults (each executed notebook shows all of its parameters)</p>")
    parts.append("<p>Executed notebooks: " + ", ".join(
        f"<a href='{n}.ipynb'>{n}</a>" for n in NOTEBOOK_ORDER if (study / f"{n}.ipynb").exists()) + "</p>")
    pre, patches, sweep = (_load(study, name) for name in ("01_pretrain", "03_patches", "04_sweep"))
    said = _claims(study, probe, patches, pre, sweep)
    if said:
        details = "".join(f"<h4>{html.escape(title)}</h4>" + figures.html_table(said[k])
                          for k, title in claims.TABLES.items())
        parts.append("<h2>The paper's claims on this data</h2><p>Each claim, the measure that tests it here, and "
                     f"what the numbers say. A probe difference counts only beyond {claims.Z:g} standard errors of "
                     f"the {said['val_clips']} validation clips' sampling: the noise of the clips, not of training "
                     "(the sweep's seeds measure that). Attention is compared clip by clip over notebook 03's clips; "
                     "the change measures give a direction only.</p>" + figures.html_table(said["lines"], text=True)
                     + f"<details><summary>The measures, family by family and model by model</summary>{details}"
                     "</details>")
    if pre:
        parts.append("<h2>Pretraining</h2>" + figures.html_table(
            [{"run": n, **{k: v for k, v in r.items() if k not in ("loss", "recon_error")},
              "final loss per block": " ".join(f"{x:.4g}" for x in r["loss"]),
              "reconstruction error per block (mean over clips)": " ".join(
                  f"{sum(c[k] for c in r['recon_error']) / len(r['recon_error']):.4g}" for k in range(len(r["loss"])))
              if r.get("recon_error") else ""}
             for n, r in pre["runs"].items()]))
        fig(figures.loss_figure({n: metrics(run_dir(study, n)) for n in pre["runs"]}))
    parts.append("<h2>Final table</h2><p>Linear probe and retrieval (R@1) at the last layer, mean pooling "
                 "(the paper's standard), with the gap to E2E; controls: the same architecture at random "
                 "initialisation, and raw pixels.</p>" + figures.html_table(probe["table"]))
    gains = [{"run": n, **g} for n, g in probe["best_gain"].items()]
    parts.append("<h3>Learning: best layer against random init</h3>" + chosen_note(gains) + figures.html_table(gains))
    if probe.get("best_layers"):
        parts.append("<h3>Best layer of every run against both controls</h3>" + chosen_note(probe["best_layers"])
                     + figures.html_table(probe["best_layers"]))
    for pooling in probe["poolings"]:
        fig(figures.probe_figure(probe["probe"], pooling))
    fig(figures.probe_figure(probe["probe"], "mean", "R@1"))
    attentive = figures.attentive_rows(probe["probe"])
    if attentive:
        parts.append("<h3>Token-level (attentive) probe</h3>" + figures.html_table(attentive))
        fig(figures.attentive_curve_figure(probe["probe"]))
    if probe.get("analysis"):
        fig(figures.change_figure(probe["analysis"]))
        for name, a in probe["analysis"].items():
            if "cka_across" in a:
                fig(figures.cka_figure(a["cka_across"], f"CKA across: {name} (rows) vs {probe['reference']}",
                                       rows=f"{name} layer", cols=f"{probe['reference']} layer"))
    if patches:
        runs = patches["runs"]
        summaries, partitions = {n: r["layers"] for n, r in runs.items()}, {n: r["partition"] for n, r in runs.items()}
        for key, rows in patches.get("controls", {}).items():  # grey dashed: the random-init encoder
            summaries[figures.CONTROLS[key]] = rows
        P, over = patches["parameters"], patches.get("attention_clips", 1)  # older studies measured one clip
        parts.append("<h2>Patch level</h2><p>Attention by layer over "
                     f"{f'the first {over} clips' if over > 1 else 'one clip'} of the {P['split']} split (dotted: "
                     "what uniform attention over all tokens gives; grey dashed: the encoder at random "
                     f"initialisation); for clip {P['clip']}, each block's reconstruction error and how many input "
                     "tubes its pooled output depends on (the exponential of the entropy of the patch-influence map, "
                     f"{P['influence_method']}).</p>")
        uniform = patches.get("uniform_attention")  # dotted: the level of attention spread over all tokens
        fig(viz.distance_figure(summaries, partitions, uniform))
        fig(viz.mixing_figure(summaries, uniform))
        fig(viz.entropy_figure(summaries, partitions, uniform))  # favours particular tokens, near or not?
        if summaries and "to_moving" in next(iter(summaries.values()))[0]:  # which: where the clip moves?
            fig(viz.moving_figure(summaries, partitions, uniform))
        parts.append(figures.html_table([{"run": n, "block": b["block"], "reconstruction error": b["recon_error"],
                                          "influence: effective tubes": b["influence_effective_tubes"]}
                                         for n, r in runs.items() for b in r["blocks"]]))
    if sweep:
        summary = sweep.get("summary", sweep["rows"])  # the mean (and sd) over seeds where there are several
        parts.append("<h2>Sweep</h2>" + figures.html_table(summary))
        fig(figures.sweep_figure(summary))
        if sweep.get("best_summary"):
            parts.append("<h3>Best layer per family and pooling</h3>" + chosen_note(sweep["best_summary"])
                         + figures.html_table(sweep["best_summary"]))
    save_text(study / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>BWSSL study</title>"
                                     f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return study / "report.html", said
