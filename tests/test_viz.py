import json
import math
from types import SimpleNamespace

import numpy as np
import papermill
import pytest
import torch

from bwssl_core import ConfigError, VideoMAE, figures, model_config, tube_mask, viz
from bwssl_core.batches import normalize_video
from bwssl_core.study import results_path
from notebook_fixtures import jupyter_env, make_study, notebook_ipynb


@pytest.fixture(scope="module")
def diag():
    """run_diagnostics of two tiny random-weight models (E2E and two blocks) on one random clip."""
    torch.manual_seed(0)
    models = {"e2e": VideoMAE(model_config("tiny")), "bwssl-k2": VideoMAE(model_config("tiny", blocks=2))}
    clip = (torch.rand(3, 4, 32, 32) * 255).to(torch.uint8)
    cfg = models["e2e"].cfg
    mask = tube_mask(1, cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(0))
    d = {name: viz.run_diagnostics(m, clip, mask) for name, m in models.items()}
    partitions = {name: m.cfg.partition for name, m in models.items()}
    return d, partitions, clip, mask, cfg


def panel_of(diag):
    d, partitions, clip, _, cfg = diag
    return viz.AttentionPanel({n: x["attn"] for n, x in d.items()}, partitions, clip, cfg)


def test_panel_block_changes_the_map_in_place(diag):
    panel = panel_of(diag)
    fig, heat = panel.figure, panel.figure.data[1]
    assert panel.block.max == 0  # e2e: one block
    panel.set(run="bwssl-k2")
    assert (panel.block.max, panel.layer.max) == (1, 1)
    before = np.array(heat.z)
    panel.set(block=1, layer=1)
    assert panel.global_layer == 3
    assert panel.figure is fig and panel.figure.data[1] is heat  # traces updated, figure not rebuilt
    assert np.abs(np.array(heat.z) - before).max() > 1e-4
    np.testing.assert_allclose(np.array(heat.z), panel.attention_map())
    assert "block 1" in fig.layout.title.text and "encoder layer 4" in fig.layout.title.text  # 1-based
    panel.set(run="e2e")  # back to one block, at the same depth
    assert panel.block.value == 0 and panel.layer.max == 3 and panel.global_layer == 3
    panel.set(layer=1)
    panel.set(run="bwssl-k2")  # layer 2 of the E2E run is block 0's second layer here
    assert (panel.block.value, panel.layer.value, panel.global_layer) == (0, 1, 1)
    draws, draw = [], panel._draw
    panel._draw = lambda: (draws.append(panel.global_layer) if not panel._busy else None, draw())
    panel.set(run="e2e", head=0)
    assert draws == [1]  # one redraw for several controls


def test_panel_follows_each_runs_head_count(diag):
    """Runs of one token grid may differ in heads (ViT-S 6, ViT-B 12 at 16 x 224 x 224): the head list is the
    shown run's, and a head the next run lacks falls back to the mean."""
    _, _, clip, _, cfg = diag
    L = cfg.num_tokens
    maps = {"four": [torch.softmax(torch.randn(4, L, L), -1)] * 2, "two": [torch.softmax(torch.randn(2, L, L), -1)] * 2}
    panel = viz.AttentionPanel(maps, {"four": (2,), "two": (2,)}, clip, cfg)
    assert [v for _, v in panel.head.options] == [-1, 0, 1, 2, 3]
    panel.set(head=3)
    panel.set(run="two")
    assert [v for _, v in panel.head.options] == [-1, 0, 1] and panel.head.value == -1
    np.testing.assert_allclose(panel.attention_map(), maps["two"][0].mean(0)[panel.query].view(cfg.grid)[0].numpy(),
                               atol=1e-3)
    panel.set(head=1)
    panel.set(run="four")
    assert panel.head.value == 1 and len(panel.head.options) == 5


def test_a_closed_panel_lets_its_maps_go(diag):
    import gc
    import weakref

    panel = panel_of(diag)
    maps = weakref.ref(panel.attn["e2e"])
    panel.close()
    del panel
    gc.collect()
    assert maps() is None


def test_panel_map_is_the_query_row_of_the_attention(diag):
    d, partitions, *_ = diag
    panel = panel_of(diag)
    panel.set(run="bwssl-k2", block=1, layer=0, head=1, frame=3, query_frame=0, row=2, col=1)
    attn = d["bwssl-k2"]["attn"][2][1]  # (L, L) of global layer 2, head 1
    query = (0 * 4 + 2) * 4 + 1  # (t', row, col) = (0, 2, 1)
    np.testing.assert_allclose(panel.attention_map(), attn[query].view(2, 4, 4)[1].numpy(), atol=1e-3)
    assert list(panel.figure.data[2].x) == [7.5, 15.5, 15.5, 7.5, 7.5]  # the query box, column 1
    panel.set(head=-1)
    mean = d["bwssl-k2"]["attn"][2].mean(0)[query].view(2, 4, 4)[1].numpy()
    np.testing.assert_allclose(panel.attention_map(), mean, atol=1e-3)
    with pytest.raises(ValueError, match="colour"):
        panel.set(colour=1)
    panel._clicked(None, SimpleNamespace(xs=[27.5], ys=[3.5]), None)  # a click on cell (row 0, col 3)
    assert (panel.query_frame.value, panel.row.value, panel.col.value) == (3, 0, 3)


def test_layer_figures(diag):
    d, partitions, _, _, cfg = diag
    summaries = {n: x["layers"] for n, x in d.items()}
    fig = viz.distance_figure(summaries, partitions)
    assert fig.layout.xaxis.title.text == "encoder layer"
    assert fig.layout.yaxis.title.text == "mean attention distance (px)"
    assert fig.layout.yaxis2.title.text == "mean attention distance (frames)"
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["e2e", "bwssl-k2", "e2e", "bwssl-k2"]
    assert all(len(t.y) == 4 for t in lines)
    assert len(fig.layout.shapes) == 2  # bwssl-k2's block boundary in both panels
    assert list(lines[0].x) == [1, 2, 3, 4] and fig.layout.shapes[0].x0 == 2.5  # 1-based, as the probe figures
    fig = viz.distance_figure(summaries, partitions, viz.uniform_attention(cfg))
    assert len(fig.layout.shapes) == 4 and fig.layout.shapes[-1].y0 == pytest.approx(1.0)  # uniform: 1 frame
    fig = viz.entropy_figure(summaries, partitions, viz.uniform_attention(cfg))
    assert fig.layout.yaxis.title.text == "attention entropy (nats)"
    assert fig.layout.shapes[-1].y0 == pytest.approx(math.log(cfg.num_tokens))
    assert all(0 < y <= math.log(cfg.num_tokens) + 1e-6 for t in fig.data for y in t.y)
    fig = viz.moving_figure(summaries, partitions, viz.uniform_attention(cfg))
    assert fig.layout.shapes[-1].y0 == pytest.approx(3 / 32) and "moves" in fig.layout.title.text
    assert all(0 <= y <= 1 for t in fig.data for y in t.y)
    fig = viz.mixing_figure(summaries)
    assert fig.layout.barmode == "stack" and len(fig.data) == 6
    total = sum(np.array(t.y) for t in fig.data[:3])
    np.testing.assert_allclose(total, 1, atol=1e-5)


def test_layer_figures_draw_the_random_init_control(diag):
    """The control is one grey dashed line per panel (no head dots, no block boundaries) and its own
    mixing panel; its rows are what run_diagnostics measures for the same encoder."""
    d, partitions, clip, _, cfg = diag
    torch.manual_seed(0)
    control = VideoMAE(model_config("tiny"))  # the same weights as the diag fixture's e2e model
    rows = viz.control_layers(control, clip)
    assert rows == d["e2e"]["layers"]
    name = figures.CONTROLS["random_init"]
    summaries = {"bwssl-k2": d["bwssl-k2"]["layers"], name: rows}
    fig = viz.distance_figure(summaries, partitions)
    traces = [t for t in fig.data if t.name == name]
    assert len(traces) == 2 and all(t.line.color == "grey" and t.line.dash == "dash" for t in traces)
    assert len(fig.data) == 6  # per panel: bwssl-k2's line and its heads, the control's line
    assert len(fig.layout.shapes) == 2  # bwssl-k2's boundary only
    np.testing.assert_allclose(traces[1].y, [np.mean(r["temporal_frames"]) for r in rows])
    fig = viz.mixing_figure(summaries)
    assert [a.text for a in fig.layout.annotations] == ["bwssl-k2", name]
    fig = viz.mixing_figure(summaries, viz.uniform_attention(cfg))  # the uniform line labelled once, no "new text"
    assert [a.text for a in fig.layout.annotations] == ["bwssl-k2", name, "uniform attention"]
    assert len(fig.layout.shapes) == 2
    assert viz.layer_results(rows)[0]["entropy_mean"] == pytest.approx(np.mean(rows[0]["entropy"]))


def test_uniform_attention_by_hand(tiny):
    """Uniform attention over the tiny grid (2 slices of 4 x 4 tubes, tubelet 2, patch 8): half the keys
    sit one slice (2 frames) away, so 1 frame on average; 1/32 to itself, 15/32 to its slice."""
    u = viz.uniform_attention(tiny())
    assert u["temporal_frames"] == pytest.approx(1.0) and u["entropy"] == pytest.approx(math.log(32))
    assert (u["self"], u["same_slice"], u["other_slices"]) == pytest.approx((1 / 32, 15 / 32, 0.5))
    assert u["to_moving"] == pytest.approx(3 / 32)  # round(10% of 32) tubes count as moving
    pos = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).flatten(0, 1) * 8
    assert u["spatial_px"] == pytest.approx(float(torch.cdist(pos, pos).mean()), rel=1e-5)


def test_mixing_shares(tiny):
    cfg = tiny()
    eye = torch.eye(cfg.num_tokens)[None, None]  # every token attends to itself only
    assert viz.mixing(eye, cfg) == {"self": [1.0], "same_slice": [0.0], "other_slices": [0.0]}
    uniform = torch.full((1, 1, 32, 32), 1 / 32)  # 16 tokens per slice
    m = viz.mixing(uniform, cfg)
    np.testing.assert_allclose([m["self"][0], m["same_slice"][0], m["other_slices"][0]], [1 / 32, 15 / 32, 0.5])


def test_patch_figures_and_results(diag):
    d, partitions, clip, mask, cfg = diag
    fig = viz.influence_figure(d["bwssl-k2"]["influence"], clip, cfg, "bwssl-k2", "gradient")
    assert [t.type for t in fig.data].count("heatmap") == 2 * cfg.grid[0]  # blocks x tube slices
    shares = sum(np.array(t.z).sum() for t in fig.data if t.type == "heatmap")
    assert shares == pytest.approx(2.0, abs=1e-4)  # each block's map sums to 1
    inf = d["bwssl-k2"]["influence"]  # subplot (row 2 + k, column s + 1) shows block k's share over slice s
    for t in (t for t in fig.data if t.type == "heatmap"):
        i = int(t.xaxis[1:] or 1) - 1  # subplots numbered row by row, T' to a row
        k, s = i // cfg.grid[0] - 1, i % cfg.grid[0]
        np.testing.assert_allclose(np.array(t.z), (inf[k] / inf[k].sum())[s].numpy(), rtol=1e-6)
    fig = viz.reconstruction_figure(d["bwssl-k2"]["reconstructions"], clip, mask, cfg, "bwssl-k2")
    assert [t.type for t in fig.data].count("image") == (2 + 2) * cfg.grid[0]  # clip, visible, 2 blocks
    assert "re-injected" in fig.layout.title.text  # the tiny preset predicts normalised tubes
    assert fig.layout.yaxis5.title.text == "block 0 recon"  # row 3, column 1 of T' = 2 columns
    assert fig.layout.yaxis5.scaleanchor == "x5" and fig.layout.yaxis5.autorange == "reversed"
    assert fig.layout.yaxis5.showgrid is False and fig.layout.xaxis5.showgrid is False  # no lines across the maps
    errors = [np.array(t.z, dtype=float) for t in fig.data if t.type == "heatmap"]
    assert any(np.isnan(e).any() for e in errors)  # visible tubes are not scored: drawn on the grey background
    assert fig.layout.plot_bgcolor == "rgb(127,127,127)" and "visible tubes grey" in fig.layout.title.text
    plain = VideoMAE(model_config("tiny", norm_target=False))
    recs = viz.run_diagnostics(plain, clip, mask)["reconstructions"]
    assert "re-injected" not in viz.reconstruction_figure(recs, clip, mask, cfg, "plain").layout.title.text
    out = viz.results(d, partitions, "gradient")
    json.dumps(out)
    assert [b["block"] for b in out["bwssl-k2"]["blocks"]] == [0, 1]
    row = out["e2e"]["layers"][0]
    assert {"layer", "block", "spatial_px_mean", "temporal_frames_mean", "entropy_mean", "self_mean"} <= set(row)
    assert len(row["spatial_px"]) == cfg.num_heads
    with pytest.raises(ConfigError, match="influence_method"):
        viz.run_diagnostics(plain, clip, mask, "saliency")


def test_static_attention_figure_is_each_shown_layers_attention_and_the_rollout_through_it(diag):
    """The saved notebook's attention maps: at each layer where a block of any run ends (here 2 and 4), the
    query's head-mean attention over each tube slice, then attention_rollout from the input through that layer."""
    from bwssl_core.attention import attention_rollout

    d, partitions, clip, _, cfg = diag
    ends = viz.block_ends(partitions)
    assert ends == [2, 4]
    T_ = cfg.grid[0]
    for run, query in (("bwssl-k2", None), ("e2e", 5)):
        attn = d[run]["attn"]
        fig = viz.attention_figure(attn, clip, cfg, run, ends, query)
        q = (1 * 4 + 2) * 4 + 2 if query is None else query  # by default the centre of the middle slice
        expected = [attn[e - 1].mean(0)[q] for e in ends] + [attention_rollout([a[None] for a in attn[:e]])[0, q]
                                                             for e in ends]
        heat = [t for t in fig.data if t.type == "heatmap"]
        assert len(heat) == 2 * len(ends) * T_ and [t.type for t in fig.data].count("image") == T_
        for t in heat:  # subplot (row 2 + r, column s + 1): row r of the maps over slice s
            i = int(t.xaxis[1:] or 1) - 1
            r, s = i // T_ - 1, i % T_
            np.testing.assert_allclose(np.array(t.z), expected[r].view(cfg.grid)[s].numpy(), rtol=1e-5, atol=1e-7)
            assert t.coloraxis == ("coloraxis" if r < len(ends) else "coloraxis2")
        others = torch.stack(expected[len(ends):])
        others[:, q] = 0  # the rollout's scale tops out at the largest weight off the query itself
        assert fig.layout.coloraxis2.cmax == pytest.approx(float(others.max()))
        assert [fig.layout[f"yaxis{1 + r * T_ if r else ''}"].title.text for r in range(5)] == \
            ["clip", "layer 2", "layer 4", "rollout 1-2", "rollout 1-4"]
    assert "slice 0, row 1, column 1" in fig.layout.title.text  # token 5 = (0, 1, 1)
    every = viz.attention_figure(d["e2e"]["attn"], clip, cfg, "e2e")  # by default every layer: 4 + 4 rows
    assert len(every.data) == (1 + 2 * 4) * T_ + 2 * 4  # the clip, the maps, the query's box in each row


def test_image_figures_of_many_blocks():
    """Plotly refuses a vertical_spacing over 1 / (rows - 1) (25 blocks: 52 reconstruction rows), and at that its
    rows have no height: every row of a deep model trained one layer a block still shows."""
    cfg = model_config("tiny")
    clip = torch.zeros(3, 4, 32, 32, dtype=torch.uint8)
    mask = tube_mask(1, cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(0))
    recs = [{"pixels": torch.rand(1, 3, 4, 32, 32), "error": torch.rand(1, *cfg.grid), "reinjected": True}] * 25
    attn = [torch.full((1, cfg.num_tokens, cfg.num_tokens), 1 / cfg.num_tokens)] * 26  # 53 rows
    for fig in (viz.reconstruction_figure(recs, clip, mask, cfg, "k25"),
                viz.influence_figure([torch.rand(cfg.grid)] * 34, clip, cfg, "k34", "gradient"),
                viz.attention_figure(attn, clip, cfg, "k26")):
        heights = [fig.layout[n].domain[1] - fig.layout[n].domain[0] for n in fig.layout if n.startswith("yaxis")]
        assert len(heights) >= 35 * 2 and min(heights) > 0.01


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("study"))


@pytest.fixture
def executed(tmp_path, monkeypatch, tiny_study):
    """Run notebooks/03_patches.py with Papermill on the tiny study: execute(**parameters)."""
    for var, value in jupyter_env(tmp_path / "jupyter").items():
        monkeypatch.setenv(var, value)
    source = notebook_ipynb("03_patches", tmp_path / "03_patches.ipynb")
    study, data = tiny_study

    def execute(**parameters):
        return papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                                          parameters={"study": str(study), "data": str(data), **parameters},
                                          kernel_name="python3", progress_bar=False, store_widget_state=False)
    return execute


@pytest.mark.timeout(300)
def test_notebook_runs_under_papermill(executed, tiny_study):
    nb = executed(device="cpu", attention_clips=3)
    titles = [o["data"]["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] for c in nb.cells
              for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert sum("attention of the query" in t for t in titles) == 2  # the panel's maps, static: one figure a run
    out = json.loads(results_path(tiny_study[0], "03_patches").read_text())
    assert out["notebook"] == "03_patches" and out["parameters"]["device"] == "cpu"
    assert out["attention_clips"] == 3  # the figures by layer average three clips
    assert set(out["runs"]) == {"e2e", "bwssl-k2"}
    assert len(out["runs"]["bwssl-k2"]["layers"]) == 4 and len(out["runs"]["bwssl-k2"]["blocks"]) == 2
    control = out["controls"]["random_init"]  # the encoder at the runs' starting weights, on the same clips
    assert len(control) == 4 and control[0]["entropy_mean"] > 0
    assert control != out["runs"]["e2e"]["layers"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("bad, named", [({"clips": 3}, "clips"), ({"clip": "first"}, "clip=")])
def test_notebook_names_a_bad_parameter(executed, bad, named):
    with pytest.raises(papermill.PapermillExecutionError, match=named):
        executed(**bad)


def test_attention_by_layer_over_several_clips_is_their_mean_with_each_clip_kept():
    """clip_layers takes one clip at a time only to bound memory: its metrics are those of all clips at once,
    and it keeps each clip's head mean, whose mean is the row's."""
    torch.manual_seed(0)
    model = VideoMAE(model_config("tiny"))
    clips = torch.randint(0, 256, (5, 3, 4, 32, 32), dtype=torch.uint8)
    whole = viz.attention_layers(model, normalize_video(clips))[1]
    rows = viz.clip_layers(model, clips)
    for r, w in zip(rows, whole):
        assert r["layer"] == w["layer"] and r["block"] == w["block"]
        for key in ("spatial_px", "temporal_frames", "entropy", "self", "same_slice", "to_moving"):
            np.testing.assert_allclose(r[key], w[key], rtol=1e-5, err_msg=key)
            assert len(r["clips"][key]) == 5
            assert np.mean(r["clips"][key]) == pytest.approx(np.mean(w[key]), rel=1e-5)
    alone = viz.attention_layers(model, normalize_video(clips[3:4]))[1]
    assert rows[1]["clips"]["entropy"][3] == pytest.approx(np.mean(alone[1]["entropy"]), rel=1e-6)
    one = viz.control_layers(model, clips[0])  # one clip (C, T, H, W) as before
    assert [{k: v for k, v in r.items() if k != "clips"} for r in one] == \
        viz.attention_layers(model, normalize_video(clips[:1]))[1]
    assert viz.layer_results(rows)[0]["entropy_mean"] == pytest.approx(np.mean(rows[0]["entropy"]))
    with pytest.raises(ConfigError, match="attention over 0 clips"):
        viz.clip_layers(model, clips[:0])
