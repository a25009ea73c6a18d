"""Patch-level figures for the notebooks: an attention scrubber for JupyterLab and static plotly
figures (widgets do not survive in a saved notebook; these do).

Inputs come from the analysis modules (attention.py, patches.py); nothing here reaches into the
model beyond `forward_intermediates`. Clips are uint8 (C, T, H, W); layers and blocks are 0-based.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .attention import MOVING_SHARE, attention_entropy, attention_maps, attention_rollout, attention_to, \
    layer_summary, mean_attention_distance, moving_count, moving_tubes, token_positions
from .batches import normalize_video
from .config import ConfigError, ModelConfig
from .figures import COLOURS, CONTROLS, line_style
from .masking import Mask
from .model import VideoMAE
from .patches import influence_gradient, influence_occlusion, reconstructions

INFLUENCE = {"gradient": influence_gradient, "occlusion": influence_occlusion}


def static_renderer() -> str:
    """Plotly renderer for executed notebooks: the figure's JSON, plus a PNG when kaleido is there."""
    return "plotly_mimetype+png" if importlib.util.find_spec("kaleido") else "plotly_mimetype"


def _rgb(clip: torch.Tensor) -> np.ndarray:
    """uint8 (C, T, H, W) -> (T, H, W, 3) for go.Image (one channel is repeated)."""
    frames = clip.permute(1, 2, 3, 0).cpu().numpy()
    return frames.repeat(3, axis=-1) if frames.shape[-1] == 1 else frames[..., :3]


def mixing(attn: torch.Tensor, cfg: ModelConfig) -> dict[str, list[float]]:
    """Where each token's attention goes, per head over all L tokens: to itself, to the other
    tokens of its time slice, to other time slices. attn (B, h, L, L) -> {share: [h]}, summing to 1."""
    slices = torch.arange(cfg.num_tokens, device=attn.device) // (cfg.grid[1] * cfg.grid[2])
    same = (slices[:, None] == slices[None, :]).to(attn.dtype)  # (L, L)
    own = attn.diagonal(dim1=-2, dim2=-1).double().mean((0, 2))
    in_slice = (attn * same).sum(-1).double().mean((0, 2))
    return {"self": own.tolist(), "same_slice": (in_slice - own).tolist(), "other_slices": (1 - in_slice).tolist()}


def uniform_attention(cfg: ModelConfig) -> dict[str, float]:
    """What attention spread evenly over all L tokens gives, by the same measures as the figures: the
    chance level that a layer's distances and mixing shares are read against (with 512 tokens in 8
    slices, 87.5% of uniform attention already goes to other time slices)."""
    L = cfg.num_tokens
    attn = torch.full((1, 1, L, L), 1 / L, dtype=torch.float64)
    spatial, temporal = mean_attention_distance(attn, token_positions(cfg))
    moving = torch.arange(L)[None] < moving_count(L)  # as many tokens as moving_tubes marks
    return {"spatial_px": float(spatial[0]), "temporal_frames": float(temporal[0]),
            "entropy": float(attention_entropy(attn)[0]), "to_moving": float(attention_to(attn, moving)[0]),
            **{k: v[0] for k, v in mixing(attn, cfg).items()}}


def attention_layers(model: VideoMAE, video: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Attention over all tokens of a normalised video (1, C, T, H, W) and its per-layer metrics, as the
    layer figures read them: ([(1, h, L, L)] per layer, [layer_summary row + block + mixing shares +
    "to_moving": the share of attention to the tubes where the clip moves most, moving_tubes])."""
    attn = attention_maps(model, video)
    layers = layer_summary(model, video, attns=attn)
    moving = moving_tubes(video, model.cfg)  # (1, L)
    spans = model.cfg.spans
    for row, a in zip(layers, attn):
        row["block"] = next(k for k, (s, e) in enumerate(spans) if s <= row["layer"] < e)
        row.update(mixing(a, model.cfg), to_moving=attention_to(a, moving).tolist())
    return attn, layers


def clip_layers(model: VideoMAE, clips: torch.Tensor) -> list[dict]:
    """attention_layers' per-layer metrics over uint8 clips (N, C, T, H, W), one clip at a time (the maps of
    all N at once would hold N h L^2 floats a layer): each list over heads is the mean over the clips, and
    row["clips"] = {metric: [the head mean of each clip]}, the spread a difference is read against."""
    if len(clips) == 0:
        raise ConfigError("attention over 0 clips: give at least one (notebook 03: attention_clips)")
    return _over_clips([attention_layers(model, normalize_video(c[None].to(model.pixel_mean.device)))[1]
                        for c in clips])


def _over_clips(per_clip: list[list[dict]]) -> list[dict]:
    """attention_layers' rows of each clip -> clip_layers' rows: per layer, the mean over clips of each list
    over heads, and "clips": each clip's head mean."""
    out = []
    for rows in zip(*per_clip):  # one layer, every clip
        keys = [k for k, v in rows[0].items() if isinstance(v, list)]
        out.append({**rows[0], **{k: np.mean([r[k] for r in rows], 0).tolist() for k in keys},
                    "clips": {k: [float(np.mean(r[k])) for r in rows] for k in keys}})
    return out


def control_layers(model: VideoMAE, clips: torch.Tensor) -> list[dict]:
    """The random-init control's per-layer attention metrics for uint8 clips (N, C, T, H, W) or one clip
    (C, T, H, W): the level a trained layer is read against (a random encoder already mixes tokens in its
    own way)."""
    return clip_layers(model, clips if clips.dim() == 5 else clips[None])


def run_diagnostics(model: VideoMAE, clip: torch.Tensor, mask: Mask, influence_method: str = "gradient",
                    clips: torch.Tensor | None = None) -> dict:
    """Everything the patch notebook shows for one model and one uint8 clip (C, T, H, W).

    Attention is measured over all tokens (no mask), reconstructions under `mask` (one clip). The
    per-layer metrics are clip_layers' of `clips` (N, C, T, H, W) when given, else of the clip.
    Returns {"attn": [(h, L, L)] per layer, "layers": [per-layer metrics, lists over heads],
    "influence": [(T', H', W')] per block, "reconstructions": patches.reconstructions(...)}.
    """
    if influence_method not in INFLUENCE:
        raise ConfigError(f"influence_method={influence_method!r}: expected one of {', '.join(INFLUENCE)}")
    device = model.pixel_mean.device
    video = normalize_video(clip[None].to(device))  # (1, C, T, H, W)
    attn, layers = attention_layers(model, video)
    layers = _over_clips([layers]) if clips is None else clip_layers(model, clips)
    blocks = range(len(model.cfg.spans))
    influence = [INFLUENCE[influence_method](model, video, k)[0].detach().cpu() for k in blocks]
    recs = reconstructions(model, video, Mask(mask.ids_keep.to(device), mask.ids_mask.to(device)))
    return {"attn": [a[0].cpu() for a in attn], "layers": layers, "influence": influence,
            "reconstructions": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()} for r in recs]}


def layer_results(layers: list[dict]) -> list[dict]:
    """Per-layer metrics for JSON: each list over heads kept, with its mean beside it (key_mean)."""
    return [{**row, **{f"{k}_mean": float(np.mean(v)) for k, v in row.items() if isinstance(v, list)}} for row in layers]


def results(diagnostics: dict[str, dict], partitions: dict[str, tuple], influence_method: str) -> dict:
    """The JSON-ready metrics: per run, per layer (lists over heads and their mean) and per block."""
    out = {}
    for run, d in diagnostics.items():
        layers = layer_results(d["layers"])
        blocks = []
        for k, (inf, rec) in enumerate(zip(d["influence"], d["reconstructions"])):
            share = (inf / inf.sum()).flatten(1).sum(1)  # (T',) share of influence per time slice
            p = (inf / inf.sum()).flatten().clamp_min(1e-12)
            blocks.append({"block": k, "recon_error": float(rec["error"].nanmean()), "reinjected": rec["reinjected"],
                           "influence_method": influence_method, "influence_by_slice": share.tolist(),
                           "influence_effective_tubes": float(torch.exp(-(p * p.log()).sum()))})
        out[run] = {"partition": list(partitions[run]), "layers": layers, "blocks": blocks}
    return out


def _square(fig: go.Figure, row_titles: list[str]) -> None:
    """Image-like subplots: rows run down, one pixel as tall as wide, no tick labels, rows named on
    the left (the right holds the colour bar)."""
    for r, title in enumerate(row_titles):
        fig.update_yaxes(title_text=title, row=r + 1, col=1)
    for name in list(fig.layout):
        if name.startswith("yaxis"):
            fig.layout[name].update(autorange="reversed", scaleanchor="x" + name[5:], showticklabels=False,
                                    constrain="domain", showgrid=False, zeroline=False)
        elif name.startswith("xaxis"):
            fig.layout[name].update(showticklabels=False, constrain="domain", showgrid=False, zeroline=False)


def _vertical_spacing(rows: int, gap: float) -> float:
    """make_subplots' vertical_spacing for image rows: `gap` (a share of the figure's height), less where the
    gaps would take over a fifth of it (plotly refuses more than 1 / (rows - 1), and at that its rows have no
    height: 25 blocks in reconstruction_figure)."""
    return min(gap, 0.2 / max(1, rows - 1))


def _by_layer(fig, summaries, partitions, key, row=1, col=1, legend=True):
    """One line per run (mean over heads), heads as faint dots, BWSSL block boundaries dashed; layers
    numbered from 1 (the first encoder layer), as the probe figures number them. A control (the
    random-init encoder, named as in figures.CONTROLS) is one grey dashed line, without heads."""
    for i, (run, rows) in enumerate(summaries.items()):
        line = line_style(run, i)
        c = line["color"]
        x = [r["layer"] + 1 for r in rows]
        fig.add_scatter(x=x, y=[float(np.mean(r[key])) for r in rows], mode="lines+markers", name=run,
                        line=line, legendgroup=run, showlegend=legend, row=row, col=col)
        if run in CONTROLS.values():
            continue
        heads = [(r["layer"] + 1, v) for r in rows for v in r[key]]
        fig.add_scatter(x=[h[0] for h in heads], y=[h[1] for h in heads], mode="markers", opacity=0.35,
                        marker=dict(color=c, size=5), legendgroup=run, showlegend=False, hoverinfo="skip",
                        row=row, col=col)
        for end in np.cumsum(partitions[run])[:-1]:
            fig.add_vline(x=end + 0.5, line_dash="dash", line_color=c, opacity=0.6, row=row, col=col)


def distance_figure(summaries: dict[str, list[dict]], partitions: dict[str, tuple],
                    uniform: dict | None = None) -> go.Figure:
    """Mean attention distance by layer, space (px) and time (frames), one line per run; dotted, what
    uniform attention gives (uniform_attention), the level that says nothing about the layer."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("spatial", "temporal"))
    _by_layer(fig, summaries, partitions, "spatial_px")
    _by_layer(fig, summaries, partitions, "temporal_frames", col=2, legend=False)
    for col, key in enumerate(("spatial_px", "temporal_frames"), start=1):
        if uniform:
            fig.add_hline(y=uniform[key], line_dash="dot", annotation_text="uniform attention", row=1, col=col)
    fig.update_xaxes(title_text="encoder layer", dtick=1)
    fig.update_yaxes(title_text="mean attention distance (px)", col=1)
    fig.update_yaxes(title_text="mean attention distance (frames)", col=2)
    fig.update_layout(title="Mean attention distance (dots: heads; dashed: block boundaries)", height=380)
    return fig


def _layer_figure(summaries, partitions, uniform, key: str, title: str, y_title: str) -> go.Figure:
    """One metric by layer, one line per run, uniform attention's level dotted."""
    fig = go.Figure()
    _by_layer(fig, summaries, partitions, key, row=None, col=None)
    if uniform:
        fig.add_hline(y=uniform[key], line_dash="dot", annotation_text="uniform attention")
    fig.update_layout(title=title, xaxis_title="encoder layer", xaxis_dtick=1, yaxis_title=y_title, height=380)
    return fig


def entropy_figure(summaries: dict[str, list[dict]], partitions: dict[str, tuple],
                   uniform: dict | None = None) -> go.Figure:
    """Attention entropy by layer: below the dotted line (uniform attention, uniform_attention) a layer
    favours particular tokens, whether or not they are near."""
    return _layer_figure(summaries, partitions, uniform, "entropy", "Attention entropy", "attention entropy (nats)")


def moving_figure(summaries: dict[str, list[dict]], partitions: dict[str, tuple],
                  uniform: dict | None = None) -> go.Figure:
    """The share of attention that goes to the tubes where the clip moves most (moving_tubes: the top
    MOVING_SHARE by frame difference), by layer: above the dotted line a layer seeks out motion."""
    return _layer_figure(summaries, partitions, uniform, "to_moving",
                         f"Attention to where the clip moves (the {MOVING_SHARE:.0%} of tubes that change most)",
                         "share of attention")


def mixing_figure(summaries: dict[str, list[dict]], uniform: dict | None = None) -> go.Figure:
    """Token mixing: stacked shares of attention to itself, its time slice and other slices, by layer;
    dotted, where uniform attention would split the bars (uniform_attention)."""
    fig = make_subplots(rows=1, cols=len(summaries), subplot_titles=list(summaries), shared_yaxes=True)
    parts = {"self": "to itself", "same_slice": "to others, same time slice", "other_slices": "to other time slices"}
    for i, rows in enumerate(summaries.values()):
        for j, (key, label) in enumerate(parts.items()):
            fig.add_bar(x=[r["layer"] + 1 for r in rows], y=[float(np.mean(r[key])) for r in rows], name=label,
                        marker_color=COLOURS[j], legendgroup=key, showlegend=i == 0, row=1, col=i + 1)
        if uniform:  # labelled once (an annotation_text of None would read "new text")
            fig.add_hline(y=uniform["self"] + uniform["same_slice"], line_dash="dot", row=1, col=i + 1,
                          **({"annotation_text": "uniform attention"} if i == 0 else {}))
    fig.update_xaxes(title_text="encoder layer", dtick=1)
    fig.update_yaxes(title_text="share of attention", range=[0, 1], col=1)
    fig.update_layout(barmode="stack", height=380, title="Token mixing (mean over heads)"
                      + ("<br><sup>dotted: the split of uniform attention</sup>" if uniform else ""))
    return fig


def influence_figure(influence: list[torch.Tensor], clip: torch.Tensor, cfg: ModelConfig, run: str,
                     method: str) -> go.Figure:
    """Each block's share of patch influence on its pooled output, per tube slice (columns), under
    the first frame of that slice."""
    T_, t = cfg.grid[0], cfg.tubelet_size
    frames = _rgb(clip)
    fig = make_subplots(rows=len(influence) + 1, cols=T_, horizontal_spacing=0.01,
                        vertical_spacing=_vertical_spacing(len(influence) + 1, 0.03),
                        column_titles=[f"frames {s * t}-{s * t + t - 1}" for s in range(T_)])
    for s in range(T_):
        fig.add_image(z=frames[s * t], row=1, col=s + 1)
        for k, inf in enumerate(influence):
            fig.add_heatmap(z=(inf / inf.sum())[s].numpy(), coloraxis="coloraxis", row=k + 2, col=s + 1)
    _square(fig, ["clip"] + [f"block {k}" for k in range(len(influence))])
    fig.update_layout(title=f"{run}: patch influence on each block's pooled output<br>"
                            f"<sup>share of the block's total, {method}</sup>",
                      coloraxis=dict(colorscale="Viridis", colorbar_title="share"),
                      height=140 * (len(influence) + 1) + 140, width=max(520, 130 * T_ + 220))
    return fig


def block_ends(partitions: dict[str, tuple]) -> list[int]:
    """The depths (layers from the input) at which a block of any run ends, in order: the layers that
    attention_figure shows, the same for every run so that runs compare row by row."""
    return sorted({int(e) for p in partitions.values() for e in np.cumsum(p)})


def attention_figure(attn: list[torch.Tensor], clip: torch.Tensor, cfg: ModelConfig, run: str,
                     ends: list[int] | None = None, query: int | None = None) -> go.Figure:
    """AttentionPanel's maps as a static figure (a saved notebook keeps no widget): one query's attention, mean
    over heads, over each tube slice (columns, under the slice's first frame) at the encoder layers `ends`
    (counted from the input; block_ends gives where the blocks of the runs end; by default every layer), then the
    attention rollout (attention_rollout) from the input through each of them: two rows of T' maps per layer shown
    (8 where the blocks of a 12-layer study end at 3, 6, 9 and 12), not a map per layer, head and frame.
    attn: [(h, L, L)] per layer (run_diagnostics' "attn"); query: a token in (t, h, w) order, by default the centre
    patch of the middle tube slice (cyan box). Each colour scale tops out at the largest weight to another token:
    the query's own (at least half of the rollout through layer 1) may lie above."""
    T_, H_, W_ = cfg.grid
    t = cfg.tubelet_size
    q = ((T_ // 2) * H_ + H_ // 2) * W_ + W_ // 2 if query is None else query
    ends = [e for e in sorted(set(ends or range(1, len(attn) + 1))) if 1 <= e <= len(attn)]
    rows, rollout, rolled, done = [], [], None, 0
    for e in ends:  # the rollout through layer e, from the one through the layer shown before
        step = attention_rollout([a[None] for a in attn[done:e]])[0]
        rolled, done = step if rolled is None else step @ rolled, e
        rows.append((f"layer {e}", attn[e - 1][:, q].float().mean(0), "coloraxis"))
        rollout.append((f"rollout 1-{e}", rolled[q], "coloraxis2"))
    rows += rollout
    frames, qs, qh, qw = _rgb(clip), q // (H_ * W_), q // W_ % H_, q % W_
    fig = make_subplots(rows=len(rows) + 1, cols=T_, horizontal_spacing=0.01,
                        vertical_spacing=_vertical_spacing(len(rows) + 1, 0.02),
                        column_titles=[f"frames {s * t}-{s * t + t - 1}" + (" (query)" if s == qs else "")
                                       for s in range(T_)])
    for s in range(T_):
        fig.add_image(z=frames[s * t], row=1, col=s + 1)
        for r, (_, a, axis) in enumerate(rows):
            fig.add_heatmap(z=a.view(T_, H_, W_)[s].cpu().numpy(), coloraxis=axis, row=r + 2, col=s + 1)
    for r in range(len(rows)):  # the query's tube, boxed as in the panel
        fig.add_scatter(x=[qw - 0.5, qw + 0.5, qw + 0.5, qw - 0.5, qw - 0.5], y=[qh - 0.5] * 2 + [qh + 0.5] * 2
                        + [qh - 0.5], mode="lines", line=dict(color="cyan", width=2), showlegend=False,
                        hoverinfo="skip", row=r + 2, col=qs + 1)
    _square(fig, ["clip"] + [name for name, _, _ in rows])
    scales = {}
    for axis, title, colours, first, last in (("coloraxis", "attention", "Inferno", 2, len(ends) + 1),
                                              ("coloraxis2", "rollout", "Viridis", len(ends) + 2, len(rows) + 1)):
        others = torch.stack([a for _, a, ax in rows if ax == axis]).clone()
        others[:, q] = 0
        top, bottom = fig.get_subplot(first, 1).yaxis.domain[1], fig.get_subplot(last, 1).yaxis.domain[0]
        scales[axis] = dict(colorscale=colours, cmin=0, cmax=float(others.max()) or None, colorbar=dict(
            title=title, y=(top + bottom) / 2, len=top - bottom, yanchor="middle"))
    fig.update_layout(title=f"{run}: attention of the query at tube slice {qs}, row {qh}, column {qw}<br><sup>"
                            "mean over heads at each layer shown; rollout: from the input through that layer</sup>",
                      height=110 * (len(rows) + 1) + 140, width=max(520, 130 * T_ + 220), **scales)
    return fig


def reconstruction_figure(recs: list[dict], clip: torch.Tensor, mask: Mask, cfg: ModelConfig, run: str) -> go.Figure:
    """Per block: its reconstruction of the clip (first frame of each tube slice) and its error per
    hidden tube (shared colour scale; visible tubes, not scored, grey: a blank cell on a light background
    read as the scale's top). Top rows: the clip and what was visible (hidden tubes grey)."""
    T_, H_, W_ = cfg.grid
    t, p = cfg.tubelet_size, cfg.patch_size
    frames = _rgb(clip)
    hidden = mask.hidden[0].view(T_, H_, W_).cpu().numpy()
    shown = frames.copy()
    shown[np.kron(hidden, np.ones((t, p, p), dtype=bool))] = 127  # hidden tubes grey
    titles = ["clip", "visible"]
    for k in range(len(recs)):
        titles += [f"block {k} recon", f"block {k} error"]
    fig = make_subplots(rows=len(titles), cols=T_, horizontal_spacing=0.01,
                        vertical_spacing=_vertical_spacing(len(titles), 0.02),
                        column_titles=[f"frame {s * t}" for s in range(T_)])
    for s in range(T_):
        fig.add_image(z=frames[s * t], row=1, col=s + 1)
        fig.add_image(z=shown[s * t], row=2, col=s + 1)
        for k, rec in enumerate(recs):
            pix = (rec["pixels"][0, :, s * t].clamp(0, 1) * 255).round().to(torch.uint8)
            fig.add_image(z=_rgb(pix[:, None])[0], row=3 + 2 * k, col=s + 1)
            fig.add_heatmap(z=rec["error"][0, s].numpy(), coloraxis="coloraxis", row=4 + 2 * k, col=s + 1)
    _square(fig, titles)
    note = "hidden tubes shown with the ground truth's per-patch mean and std re-injected" \
        if recs and recs[0]["reinjected"] else "hidden tubes as predicted, in pixels"
    fig.update_layout(title=f"{run}: each block's reconstruction<br><sup>{note}; error rows: visible tubes grey "
                            "(not scored)</sup>", plot_bgcolor="rgb(127,127,127)",
                      height=110 * len(titles) + 140, width=max(520, 130 * T_ + 220),
                      coloraxis=dict(colorscale="Magma", colorbar_title="MSE per tube"))
    return fig


class AttentionPanel:
    """Scrub attention maps in JupyterLab: run, block, layer within the block, head (or the mean),
    shown frame, and query patch (its frame, row and column; or click the map). The heat map shows
    the query's attention to the tokens of the shown frame's tube slice, over that frame.

    attentions: {run: [(h, L, L)] per layer} for one clip (as run_diagnostics gives);
    partitions: {run: layers per block}; clip: uint8 (C, T, H, W). Display `panel.widget`.
    """

    def __init__(self, attentions: dict[str, list[torch.Tensor]], partitions: dict[str, tuple],
                 clip: torch.Tensor, cfg: ModelConfig):
        import ipywidgets as w

        self.cfg, self.partitions = cfg, {run: tuple(partitions[run]) for run in attentions}
        self.attn = {run: torch.stack(maps).half() for run, maps in attentions.items()}  # (layers, h, L, L)
        self.frames = _rgb(clip)
        T_, H_, W_ = cfg.grid
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.run = w.Dropdown(options=list(attentions), description="run")
        self.head = w.Dropdown(options=[("mean", -1)], description="head")  # the run's heads: _run_changed
        self.block = w.IntSlider(0, min=0, max=0, description="block", **slider)
        self.layer = w.IntSlider(0, min=0, max=0, description="layer in block", **slider)
        self.frame = w.IntSlider(0, min=0, max=cfg.num_frames - 1, description="shown frame", **slider)
        self.query_frame = w.IntSlider(0, min=0, max=cfg.num_frames - 1, description="query frame", **slider)
        self.row = w.IntSlider(H_ // 2, min=0, max=H_ - 1, description="query row", **slider)
        self.col = w.IntSlider(W_ // 2, min=0, max=W_ - 1, description="query column", **slider)
        p = cfg.patch_size
        self.figure = go.FigureWidget(
            [go.Image(z=self.frames[0], meta=0, hoverinfo="skip"),
             go.Heatmap(z=np.zeros((H_, W_)), x0=(p - 1) / 2, dx=p, y0=(p - 1) / 2, dy=p, opacity=0.6,
                        colorscale="Inferno", colorbar_title="attention", name="attention"),
             go.Scatter(x=[], y=[], mode="lines", line=dict(color="cyan", width=3), name="query", hoverinfo="skip")],
            layout=dict(width=520, height=520, margin=dict(t=60), yaxis=dict(scaleanchor="x"), showlegend=False))
        self.figure.data[1].on_click(self._clicked)
        self._busy, self._shown = False, 0  # _shown: the global layer drawn last
        self.run.observe(self._run_changed, "value")
        self.block.observe(self._block_changed, "value")
        for c in (self.layer, self.head, self.frame, self.query_frame, self.row, self.col):
            c.observe(lambda _: self._draw(), "value")
        self.widget = w.VBox([w.HBox([self.run, self.head]), w.HBox([self.block, self.layer]),
                              w.HBox([self.frame, self.query_frame]), w.HBox([self.row, self.col]), self.figure])
        self.widget.add_class("bwssl-attention-panel")
        self._run_changed()

    @property
    def global_layer(self) -> int:
        return sum(self.partitions[self.run.value][:self.block.value]) + self.layer.value

    @property
    def query(self) -> int:
        """Index of the query token in (t, h, w) raster order."""
        _, H_, W_ = self.cfg.grid
        return (self.query_frame.value // self.cfg.tubelet_size * H_ + self.row.value) * W_ + self.col.value

    def attention_map(self) -> np.ndarray:
        """(H', W'): the query's attention to the tokens of the shown frame's tube slice."""
        T_, H_, W_ = self.cfg.grid
        a = self.attn[self.run.value][self.global_layer][:, self.query].float()  # (h, L): the query's row only
        a = a.mean(0) if self.head.value < 0 else a[self.head.value]
        s = self.frame.value // self.cfg.tubelet_size
        return a.view(T_, H_, W_)[s].numpy()

    def set(self, **values) -> None:
        """Set controls by name (run, block, layer, head, frame, query_frame, row, col), redrawing once."""
        order = ["run", "block", "layer", "head", "frame", "query_frame", "row", "col"]
        unknown = set(values) - set(order)
        if unknown:
            raise ValueError(f"unknown control(s) {sorted(unknown)}: expected {order}")
        self._busy = True
        try:
            for name in (n for n in order if n in values):
                getattr(self, name).value = values[name]
        finally:
            self._busy = False
        self._draw()

    def close(self) -> None:
        """Close the widgets and drop the attention maps (ipywidgets keeps every widget alive, and with
        it the panel: re-running the cell that makes one would otherwise keep them all)."""
        for c in (self.run, self.head, self.block, self.layer, self.frame, self.query_frame, self.row, self.col,
                  self.figure, self.widget):
            c.close()
        self.attn = {}

    def _run_changed(self, _=None) -> None:
        """Another run: the layer shown before, in this run's block and layer within it; the head shown
        before where this run has it, else the mean (runs of one grid may differ in heads)."""
        sizes = self.partitions[self.run.value]
        layer = min(self._shown, sum(sizes) - 1)
        block = next(k for k in range(len(sizes)) if layer < sum(sizes[:k + 1]))
        heads = self.attn[self.run.value].shape[1]
        was, self._busy = self._busy, True  # one draw at the end (none inside set(), which draws itself)
        try:
            head = self.head.value if self.head.value < heads else -1
            self.head.options = [("mean", -1)] + [(str(i), i) for i in range(heads)]
            self.head.value = head
            self.block.max = len(sizes) - 1
            self.block.value = block
            self.layer.max = sizes[block] - 1
            self.layer.value = layer - sum(sizes[:block])
        finally:
            self._busy = was
        self._draw()

    def _block_changed(self, _=None) -> None:
        self.layer.max = self.partitions[self.run.value][self.block.value] - 1
        self._draw()

    def _clicked(self, trace, points, state) -> None:
        if points.xs:  # heat map cell centres sit at (p - 1) / 2 + index * p
            p = self.cfg.patch_size
            self.set(query_frame=self.frame.value, row=round(points.ys[0] // p), col=round(points.xs[0] // p))

    def _draw(self) -> None:
        if self._busy:
            return
        p, t = self.cfg.patch_size, self.cfg.tubelet_size
        self._shown = self.global_layer
        z = self.attention_map()
        x0, y0 = self.col.value * p - 0.5, self.row.value * p - 0.5
        same = self.query_frame.value // t == self.frame.value // t
        head = "mean over heads" if self.head.value < 0 else f"head {self.head.value}"
        with self.figure.batch_update():
            if self.figure.data[0].meta != self.frame.value:  # send a frame only when it changes
                self.figure.data[0].update(z=self.frames[self.frame.value], meta=self.frame.value)
            self.figure.data[1].z = z
            self.figure.data[2].x = [x0, x0 + p, x0 + p, x0, x0]
            self.figure.data[2].y = [y0, y0, y0 + p, y0 + p, y0]
            self.figure.data[2].line.dash = "solid" if same else "dot"
            self.figure.layout.title.text = (
                f"{self.run.value}, block {self.block.value}, encoder layer {self.global_layer + 1}, {head}<br>"
                f"query at frame {self.query_frame.value} ({'solid' if same else 'dotted: another slice'}); "
                f"{z.sum():.0%} of its attention is on this slice")
