"""Study figures and tables (plotly), shared by the notebooks and the HTML report.

Inputs are the JSON-ready results of the library: metrics.jsonl rows (train.py), depthwise probe
results (evaluate.py: {model: {pooling: {family: {metric: [per layer]}}}}) and analyze() output.
"""
from __future__ import annotations

import html
import statistics

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

CONTROLS = {"random_init": "random init", "pixels": "raw pixels"}
COLOURS = qualitative.Plotly


def loss_figure(runs: dict[str, list[dict]]) -> go.Figure:
    """Each block's training loss against step, one panel per run."""
    fig = make_subplots(rows=1, cols=len(runs), subplot_titles=list(runs), shared_yaxes=True)
    for col, (name, rows) in enumerate(runs.items(), start=1):
        steps = [r["step"] for r in rows]
        for k in range(len(rows[0]["loss"]) if rows else 0):
            fig.add_scatter(x=steps, y=[r["loss"][k] for r in rows], name=f"block {k}", mode="lines",
                            line_color=COLOURS[k % len(COLOURS)], legendgroup=str(k),
                            showlegend=all(len(r[0]["loss"]) <= k for r in list(runs.values())[:col - 1] if r),
                            row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
    fig.update_yaxes(type="log", dtick=1)  # the loss falls by 30x in the first hundred steps; ticks by decade
    fig.update_yaxes(title_text="masked reconstruction loss", row=1, col=1)
    fig.update_layout(title="Pretraining loss of each block", height=380)
    return fig


def probe_figure(probe: dict[str, dict], pooling: str = "mean", metric: str = "acc") -> go.Figure:
    """Per label family, `metric` against layer for every run, with the controls (random init of the
    first run's architecture as a dashed line over depth, raw pixels as a dotted level)."""
    first = next(iter(probe.values()))
    families = list(first["trained"][pooling])
    fig = make_subplots(rows=1, cols=len(families), subplot_titles=families, shared_yaxes=True)
    for col, fam in enumerate(families, start=1):
        for i, (name, res) in enumerate(probe.items()):
            y = res["trained"][pooling][fam][metric]
            fig.add_scatter(x=list(range(1, len(y) + 1)), y=y, name=name, mode="lines+markers", legendgroup=name,
                            line_color=COLOURS[i % len(COLOURS)], showlegend=col == 1, row=1, col=col)
        rnd = first["random_init"][pooling][fam][metric]
        fig.add_scatter(x=list(range(1, len(rnd) + 1)), y=rnd, name=CONTROLS["random_init"], mode="lines",
                        line=dict(color="grey", dash="dash"), legendgroup="r", showlegend=col == 1, row=1, col=col)
        pix = first["pixels"][pooling][fam][metric][0]
        fig.add_scatter(x=[1, len(rnd)], y=[pix, pix], name=CONTROLS["pixels"], mode="lines",
                        line=dict(color="black", dash="dot"), legendgroup="p", showlegend=col == 1, row=1, col=col)
        fig.update_xaxes(title_text="encoder layer", row=1, col=col)
    fig.update_yaxes(title_text="top-1" if metric == "acc" else metric, row=1, col=1)
    fig.update_layout(title=f"Depth-wise {'linear probe' if metric == 'acc' else metric}, {pooling} pooling",
                      height=360)
    return fig


def cka_figure(matrix: list[list[float]], title: str, rows: str = "layer", cols: str = "layer") -> go.Figure:
    """A CKA matrix, its colours spanning the values it holds (CKA between layers of related models often
    lies within a few hundredths of 1, where a 0-1 scale shows one colour), each value printed on its cell."""
    n, m = len(matrix), len(matrix[0])
    low = min(min(row) for row in matrix)
    fig = go.Figure(go.Heatmap(z=matrix, x=list(range(1, m + 1)), y=list(range(1, n + 1)), zmin=min(low, 0.999),
                               zmax=1, colorscale="Viridis", colorbar_title="CKA", texttemplate="%{z:.3f}"))
    fig.update_layout(title=title, xaxis_title=cols, yaxis_title=rows, height=360, width=max(420, 60 * m + 120))
    return fig


def line_style(name: str, i: int) -> dict:
    """The i-th run's line colour; a control (named as in CONTROLS) grey and dashed."""
    return dict(color="grey", dash="dash") if name in CONTROLS.values() else dict(color=COLOURS[i % len(COLOURS)])


def change_figure(analysis: dict[str, dict]) -> go.Figure:
    """How much each layer changes its input, and how well it keeps the geometry, per run; an entry named
    as a control (CONTROLS: the random-init encoder) drawn grey and dashed. Raw pixels have no depth, so
    no curve here."""
    keys = [("token_relative_change", "relative change (tokens)"), ("consecutive_cka", "CKA with the layer before"),
            ("knn_overlap", "kNN overlap with the layer before"), ("effective_rank", "effective rank")]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[t for _, t in keys])
    for col, (key, _) in enumerate(keys, start=1):
        for i, (name, res) in enumerate(analysis.items()):
            y = res[key]
            start = 1 if key == "effective_rank" else 2  # the change metrics compare layer l with l - 1
            line = line_style(name, i)
            fig.add_scatter(x=list(range(start, start + len(y))), y=y, name=name, mode="lines+markers", line=line,
                            legendgroup=name, showlegend=col == 1, row=1, col=col)
        fig.update_xaxes(title_text="encoder layer", dtick=1, row=1, col=col)
    fig.update_layout(title="Representational change across depth", height=360)
    return fig


def final_table(probe: dict[str, dict], pooling: str = "mean", reference: str = "e2e") -> list[dict]:
    """The paper's table: linear probe and R@1 at the last layer per run and family, the gap to the
    reference (E2E) run, and the two controls of the reference's architecture."""
    ref = probe.get(reference) or next(iter(probe.values()))
    rows = []
    for fam in ref["trained"][pooling]:
        base = ref["trained"][pooling][fam]
        models = [(name, res["trained"]) for name, res in probe.items()]
        models += [(label, ref[key]) for key, label in CONTROLS.items()]
        for name, res in models:
            r = res[pooling][fam]
            rows.append({"family": fam, "model": name, "linear": r["acc"][-1], "R@1": r["R@1"][-1],
                         "gap_linear": r["acc"][-1] - base["acc"][-1], "gap_R@1": r["R@1"][-1] - base["R@1"][-1]})
    return rows


HELD_OUT = "held-out training clips"  # how best_index chose a layer, as best_layers and claims label it
ON_VALIDATION = "validation (no held-out scores: optimistic)"


def _held_out(r: dict) -> list | None:
    """r's per-layer held-out scores, or None where it has none (older results, an attentive probe at holdout=0)."""
    held = r.get("holdout_acc")
    return None if held is None or None in held else held


def best_index(r: dict) -> int:
    """The layer (index into r's per-layer lists) with the best top-1 on the held-out part of the training
    split (`holdout_acc`, the linear and attentive probes'; ties: the earlier), so that the layer is not chosen
    on the validation clips that then score it (the largest of equally good layers' validation scores is about
    one standard error above their mean). Results without held-out scores (attentive probes before they had
    them, or holdout=0): the layer best on validation (chosen_on says which)."""
    scores = _held_out(r) or r["acc"]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def best_acc(r: dict, metric: str = "acc") -> float:
    """`metric` (validation top-1, or R@k: retrieval has no held-out score of its own) at best_index's layer."""
    return r[metric][best_index(r)]


def chosen_on(*results: dict) -> str:
    """How best_index chose the layers of these results: HELD_OUT, or ON_VALIDATION where any multi-layer one
    lacks held-out scores."""
    lacking = any(len(r["acc"]) > 1 and _held_out(r) is None for r in results)
    return ON_VALIDATION if lacking else HELD_OUT


def best_gain(probe_results: dict) -> dict:
    """The best layer's margin of a run over its random-init control (each layer chosen by best_index, scored
    on validation): the largest over families and poolings, with where it is."""
    best = None
    for pool, fams in probe_results["trained"].items():
        for fam, r in fams.items():
            control = probe_results["random_init"][pool][fam]
            gain = best_acc(r) - best_acc(control)
            if best is None or gain > best["gain"]:
                best = {"gain": gain, "family": fam, "pooling": pool, "trained": best_acc(r),
                        "random_init": best_acc(control), "layer chosen on": chosen_on(r, control)}
    return best


def best_layers(probe: dict[str, dict], reference: str = "e2e") -> list[dict]:
    """Per family and pooling (the attentive probe too), every run's best-layer top-1 beside both controls
    (the reference's architecture) and `margin`: the weakest run's lead over the stronger control (negative:
    some run is below a control), so that a claim such as "motion clears the controls" reads off one row
    with its size. Each best layer is chosen on held-out training clips (best_index) and scored on validation;
    `layer chosen on` says so, or that some entry had no held-out scores."""
    ref = probe.get(reference) or next(iter(probe.values()))
    rows = []
    for pool, fams in ref["trained"].items():
        for fam in fams:
            entries = {name: res["trained"][pool][fam] for name, res in probe.items()}
            entries.update({label: ref[key][pool][fam] for key, label in CONTROLS.items()})
            runs = {name: best_acc(entries[name]) for name in probe}
            controls = {label: best_acc(entries[label]) for label in CONTROLS.values()}
            rows.append({"family": fam, "pooling": pool, **runs, **controls,
                         "margin": min(runs.values()) - max(controls.values()),
                         "layer chosen on": chosen_on(*entries.values())})
    return sorted(rows, key=lambda r: r["family"])


def attentive_rows(probe: dict[str, dict]) -> list[dict]:
    """The token-level (attentive) probe's top-1 per run, model (trained and the controls) and family,
    at the last of its layers, with the epoch it kept of its budget (chosen on held-out clips: one at the
    budget's end may want more)."""
    return [{"run": name, "model": CONTROLS.get(m, m), "family": fam, "layers": str(r["layers"]), "acc": r["acc"][-1],
             **({"epoch": f"{r['epoch'][-1]} of {r['epochs'][-1]}"} if "epoch" in r else {})}
            for name, res in probe.items() for m in ("trained", *CONTROLS)
            for fam, r in res[m].get("attentive", {}).items()]


def attentive_curve_figure(probe: dict[str, dict]) -> go.Figure:
    """The attentive probe's held-out top-1 after each epoch, per family, for every run and both controls
    (the first run's), at the last probed layer, with a marker at the epoch kept: whether each had
    levelled off within its budget."""
    first = next(iter(probe.values()))
    curves = {name: res["trained"] for name, res in probe.items()}
    curves.update({label: first[key] for key, label in CONTROLS.items()})
    families = list(first["trained"].get("attentive", {}))
    fig = make_subplots(rows=1, cols=max(1, len(families)), subplot_titles=families, shared_yaxes=True)
    for col, fam in enumerate(families, start=1):
        for i, (name, res) in enumerate(curves.items()):
            r = res.get("attentive", {}).get(fam, {})
            if not r.get("holdout_curve") or not r["holdout_curve"][-1]:
                continue
            y, kept = r["holdout_curve"][-1], r["epoch"][-1]
            line = dict(color=COLOURS[i % len(COLOURS)]) if name in probe else \
                dict(color="grey" if name == CONTROLS["random_init"] else "black", dash="dash")
            fig.add_scatter(x=list(range(1, len(y) + 1)), y=y, name=name, mode="lines", line=line, legendgroup=name,
                            showlegend=col == 1, row=1, col=col)
            fig.add_scatter(x=[kept], y=[y[kept - 1]], mode="markers", marker=dict(color=line["color"], size=9),
                            name=f"{name}: kept", legendgroup=name, showlegend=False, row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_yaxes(title_text="held-out top-1", row=1, col=1)
    fig.update_layout(title="Attentive probe: held-out top-1 by epoch (dot: the epoch kept)", height=360)
    return fig


def _leads(row: dict, value: float, blocks: dict[str, int], others: dict) -> dict:
    """A run's lead over the random-init control and over E2E (the point's K = 1 run), both of its seed
    (`others`: {model: value} of the same family and pooling); "" where it has none (a control, E2E
    itself, a point without E2E)."""
    trained = row["model"] in blocks
    e2e = next((name for name, k in blocks.items() if k == 1), None)
    row["vs random init"] = value - others[CONTROLS["random_init"]] if trained else ""
    row["vs E2E"] = value - others[e2e] if trained and e2e and row["model"] != e2e else ""
    return row


def sweep_rows(table: list[dict], preset: str, blocks: dict[str, int], seed: int) -> list[dict]:
    """One sweep point's rows from its final table (notebook 02): each run in `blocks` ({run: K}) and both
    controls of the preset's architecture, last layer, with a run's lead over the random-init control and
    over E2E (the point's K = 1 run) on the same family, both of the same seed."""
    by_family: dict[str, dict] = {}
    for r in table:
        by_family.setdefault(r["family"], {})[r["model"]] = r["linear"]
    return [_leads({"preset": preset, "seed": seed, "model": r["model"], "blocks": blocks.get(r["model"], ""),
                    "family": r["family"], "linear": r["linear"], "R@1": r["R@1"]},
                   r["linear"], blocks, by_family[r["family"]])
            for r in table if r["model"] in blocks or r["model"] in CONTROLS.values()]


def sweep_best_rows(best: list[dict], preset: str, blocks: dict[str, int], seed: int) -> list[dict]:
    """The same from a point's best_layers (notebook 02): per family and pooling the best layer's top-1 (the
    layer chosen on held-out training clips, scored on validation) of every run and control (where the CPU
    study's learning shows: temporal slices, not the last layer's mean), with the leads of sweep_rows."""
    return [_leads({"preset": preset, "seed": seed, "model": model, "blocks": blocks.get(model, ""),
                    "family": r["family"], "pooling": r["pooling"], "best layer": r[model],
                    **({"layer chosen on": r["layer chosen on"]} if "layer chosen on" in r else {})},
                   r[model], blocks, r)
            for r in best for model in [*blocks, *CONTROLS.values()]]


MEASURES = ("linear", "R@1", "best layer", "vs random init", "vs E2E")  # what seed_summary averages


def seed_summary(rows: list[dict]) -> list[dict]:
    """sweep_rows (or sweep_best_rows) over seeds: per point (every column but the seed and the measures)
    the mean of each measure and, with more than one seed, its standard deviation over seeds (sample,
    n - 1; none for R@1): whether a lead is larger than what another draw of weights, masks and clip
    order moves it by."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple((k, v) for k, v in r.items() if k != "seed" and k not in MEASURES), []).append(r)
    several = any(len(g) > 1 for g in groups.values())
    out = []
    for key, group in groups.items():
        row = {**dict(key), "seeds": len(group)}
        for col in (c for c in MEASURES if c in group[0]):
            values = [r[col] for r in group if r[col] != ""]
            row[col] = statistics.mean(values) if values else ""
            if several and col != "R@1":
                row[f"{col} sd"] = statistics.stdev(values) if len(values) > 1 else ""
        out.append(row)
    return out


def sweep_figure(summary: list[dict]) -> go.Figure:
    """Last-layer linear probe against K per family, one line per preset (bars: sd over seeds when the
    summary has it), its controls as levels across K."""
    fams = sorted({r["family"] for r in summary})
    presets = list(dict.fromkeys(r["preset"] for r in summary))
    fig = make_subplots(rows=1, cols=len(fams), subplot_titles=fams, shared_yaxes=True)
    for i, preset in enumerate(presets):
        colour = COLOURS[i % len(COLOURS)]
        for col, fam in enumerate(fams, start=1):
            mine = [r for r in summary if r["preset"] == preset and r["family"] == fam]
            pts = sorted((r["blocks"], r["linear"], r.get("linear sd") or 0.0) for r in mine if r["blocks"] != "")
            fig.add_scatter(x=[k for k, _, _ in pts], y=[a for _, a, _ in pts], mode="lines+markers", name=preset,
                            error_y=dict(array=[sd for _, _, sd in pts], visible="linear sd" in mine[0]),
                            line_color=colour, legendgroup=preset, showlegend=col == 1, row=1, col=col)
            for r in (r for r in mine if r["blocks"] == ""):
                dash = "dash" if r["model"] == CONTROLS["random_init"] else "dot"
                fig.add_scatter(x=[pts[0][0], pts[-1][0]], y=[r["linear"]] * 2, mode="lines",
                                line=dict(color=colour, dash=dash), name=f"{preset} {r['model']}",
                                legendgroup=preset, showlegend=col == 1, row=1, col=col)
    seeds = max(r.get("seeds", 1) for r in summary)
    ks = sorted({r["blocks"] for r in summary if r["blocks"] != ""})
    fig.update_xaxes(title_text="K (1 = E2E)", type="log", tickvals=ks)
    fig.update_yaxes(title_text="top-1", row=1, col=1)
    fig.update_layout(title="Last-layer linear probe (mean pooling) against the number of blocks K<br>"
                            "<sup>dashed: random init, dotted: raw pixels, each preset's"
                            + (f"; mean over {seeds} seeds, bars: sd" if seeds > 1 else "") + "</sup>", height=380)
    return fig


def number(v: float, digits: int = 3) -> str:
    """`digits` decimals for values from 0.01 to 100 (accuracies, gaps), whole numbers from 100, and
    `digits` significant digits below 0.01, so that 0.00681 and 0.00700 stay apart."""
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:#.{digits}g}"  # '#': 0.00700, not 0.007


def html_table(rows: list[dict], digits: int = 3, text: bool = False) -> str:
    """A plain HTML table of dict rows (floats as number() writes them); `text`: cells aligned left, for
    sentences rather than numbers."""
    if not rows:
        return "<p>(no rows)</p>"
    cols = list(rows[0])
    fmt = lambda v: number(v, digits) if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table class='results{' text' if text else ''}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
