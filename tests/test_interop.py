"""Equivalence with HF transformers' VideoMAEForPreTraining (a test-only dependency)."""
import pytest
import torch

from bwssl_core import ConfigError
from bwssl_core.interop import from_hf, from_hf_pixel_values, hf_to_official, load_official
from bwssl_core.masking import tube_mask

transformers = pytest.importorskip("transformers")


def _hf_model(**kw):
    cfg = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=48, num_hidden_layers=3,
        num_attention_heads=3, intermediate_size=96, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2, decoder_intermediate_size=64, attn_implementation="eager", **kw)
    model = transformers.VideoMAEForPreTraining(cfg).eval()
    with torch.no_grad():  # move every weight off its init so that a swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("kw", [dict(use_mean_pooling=False, norm_pix_loss=True),
                                dict(use_mean_pooling=True, norm_pix_loss=False)])
def test_matches_transformers_encoder_and_loss(kw):
    hf = _hf_model(**kw)
    ours = from_hf(hf).eval()
    assert ours.cfg.pos_embed == "1d" and ours.cfg.dec_norm == (not kw["use_mean_pooling"])
    pixel_values = torch.randn(3, 4, 3, 32, 32)  # HF layout (B, T, C, H, W)
    mask = tube_mask(3, ours.cfg.grid, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_enc = hf.videomae(pixel_values=pixel_values, bool_masked_pos=mask.hidden).last_hidden_state
        hf_loss = hf(pixel_values=pixel_values, bool_masked_pos=mask.hidden).loss
        video = from_hf_pixel_values(pixel_values)
        _, z = ours.stages[0](video, mask.ids_keep)  # our encoder output after its final norm (if any)
        (loss,) = ours(video, mask)
    torch.testing.assert_close(z, hf_enc, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, hf_loss, atol=2e-5, rtol=1e-4)


def test_official_checkpoint_file(tmp_path):
    hf = _hf_model(use_mean_pooling=False)
    sd = hf_to_official(hf.state_dict())
    assert "encoder.blocks.0.attn.q_bias" in sd and "encoder.blocks.2.attn.qkv.weight" in sd
    path = tmp_path / "videomae_pretrain.pth"
    torch.save({"model": sd}, path)
    ours, missing, unused = load_official(path, img_size=32, num_frames=4, num_heads=3, dec_heads=2)
    assert missing == [] and unused == []
    reference = from_hf(hf)
    for name, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    torch.save({"model": {"something": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="not an official VideoMAE checkpoint"):
        load_official(path)


def test_official_weights_into_blockwise_partition():
    hf = _hf_model(use_mean_pooling=False)
    from bwssl_core.interop import config_from_hf, load_converted
    from bwssl_core.model import VideoMAE
    e2e = from_hf(hf)
    bw = load_converted(VideoMAE(config_from_hf(hf.config, partition=(1, 2))), hf_to_official(hf.state_dict()),
                        strict=False)
    video = torch.randn(2, 3, 4, 32, 32)
    for a, b in zip(e2e.forward_intermediates(video), bw.forward_intermediates(video)):
        assert torch.equal(a, b)


def test_an_mlp_width_that_its_ratio_does_not_give_back_exactly():
    """704 x (3840 / 704) is 3839.99... in floating point: the MLP would be built one unit short. A decoder
    MLP of another ratio than the encoder's has no place here: a clear error, not a size mismatch."""
    sizes = dict(image_size=32, patch_size=16, num_frames=2, tubelet_size=2, hidden_size=704, num_hidden_layers=1,
                 num_attention_heads=11, intermediate_size=3840, decoder_hidden_size=352, decoder_num_hidden_layers=1,
                 decoder_num_attention_heads=11)
    assert int(704 * (3840 / 704)) == 3839
    ours = from_hf(transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**sizes,
                                                                                   decoder_intermediate_size=1920)))
    assert ours.layers[0].mlp.fc1.out_features == 3840 and ours.decoders[0].layers[0].mlp.fc1.out_features == 1920
    with pytest.raises(ConfigError, match="decoder_intermediate_size=1408: the decoder's MLP here is 1920 wide"):
        from_hf(transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**sizes,
                                                                                decoder_intermediate_size=1408)))


def test_presets_are_videomaes_sizes():
    """Loading official weights takes the head counts from the preset (the tensors' shapes do not carry
    them), so a preset must match VideoMAE's pretrain_videomae_*_patch16_224 exactly: encoder width, depth
    and heads, decoder width and heads (ViT-H's decoder has 8 heads of 80, not 10 of 64)."""
    from bwssl_core.config import model_config

    official = {"vit_s": (384, 12, 6, 192, 3), "vit_b": (768, 12, 12, 384, 6), "vit_l": (1024, 24, 16, 512, 8),
                "vit_h": (1280, 32, 16, 640, 8)}
    for name, sizes in official.items():
        c = model_config(name)
        assert (c.embed_dim, c.depth, c.num_heads, c.dec_dim, c.dec_heads) == sizes, name
        assert (c.dec_depth, c.patch_size, c.tubelet_size, c.img_size, c.num_frames) == (4, 16, 2, 224, 16), name


def test_imported_weights_probe_and_analyze_from_the_command_line(tmp_path, synth_data, capsys):
    """`bwssl import` turns an HF folder and an official checkpoint of the same weights into run folders
    that load, probe and analyze like trained runs; the two imports are the same model."""
    import json

    from bwssl_core.cli import main
    from bwssl_core.train import load_run

    hf = _hf_model(use_mean_pooling=False)
    folder, official = tmp_path / "hf", tmp_path / "videomae_pretrain.pth"
    hf.save_pretrained(folder)
    torch.save({"model": hf_to_official(hf.state_dict())}, official)
    reference = from_hf(hf).state_dict()
    sizes = ["--img-size", "32", "--num-frames", "4", "--num-heads", "3", "--dec-heads", "2"]
    for source, flags, kind in ((folder, [], "hf"), (official, sizes, "official")):
        run = tmp_path / f"run-{kind}"
        assert main(["import", "--weights", str(source), "--out", str(run), *flags]) == 0
        model, config = load_run(run)
        assert [k for k, v in reference.items() if not torch.equal(model.state_dict()[k], v)] == []
        assert config["imported"]["format"] == kind
        assert config["imported"]["not_in_weights"] == [] and config["imported"]["unused"] == []
        assert len(next(iter(config["imported"]["sha256"].values()))) == 64
    capsys.readouterr()
    assert main(["probe", "--run", str(tmp_path / "run-hf"), "--data", str(synth_data), "--families", "motion",
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "run-hf" / "probe.json").read_text())["results"]
    assert set(results) == {"trained", "random_init", "pixels"} and len(results["trained"]["mean"]["motion"]["acc"]) == 3
    assert main(["analyze", "--run", str(tmp_path / "run-hf"), "--vs", str(tmp_path / "run-official"),
                 "--data", str(synth_data), "--batch-size", "8", "--device", "cpu"]) == 0
    cross = json.loads((tmp_path / "run-hf" / "analyze.json").read_text())["cka_across"]
    assert [round(cross[i][i], 4) for i in range(3)] == [1.0] * 3  # the same weights, layer by layer
    # an import never replaces a run, and an imported run has nothing to resume
    capsys.readouterr()
    assert main(["import", "--weights", str(folder), "--out", str(tmp_path / "run-hf")]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" not in err
    assert main(["pretrain", "--out", str(tmp_path / "run-hf"), "--resume", "--data", "synthetic", "--preset", "tiny",
                 "--steps", "2", "--device", "cpu"]) == 2
    assert "imported with `bwssl import`, not a training run" in capsys.readouterr().err


def test_import_of_an_encoder_without_decoder_and_of_what_is_not_videomae(tmp_path, capsys):
    from bwssl_core.cli import main
    from bwssl_core.train import load_run

    cfg = _hf_model().config
    classifier = transformers.VideoMAEForVideoClassification(cfg).eval()  # mean pooling: no final encoder norm
    classifier.save_pretrained(tmp_path / "cls")
    assert main(["import", "--weights", str(tmp_path / "cls"), "--out", str(tmp_path / "run")]) == 0
    model, config = load_run(tmp_path / "run")
    missing = config["imported"]["not_in_weights"]
    assert missing and all(k.startswith(("decoder.", "encoder_to_decoder", "mask_token")) for k in missing)
    assert config["imported"]["unused"] == ["classifier.bias", "classifier.weight", "fc_norm.bias", "fc_norm.weight"]
    video = torch.randn(2, 4, 3, 32, 32)  # HF layout
    with torch.no_grad():
        hf_out = classifier.videomae(pixel_values=video, output_hidden_states=True).hidden_states[1:]
        ours = model.forward_intermediates(from_hf_pixel_values(video))
    for a, b in zip(ours, hf_out):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    hf_file = tmp_path / "hf_state.pth"
    torch.save(classifier.state_dict(), hf_file)
    bad = {tmp_path / "hf_state.pth": "HF transformers weights: pass the folder",
           tmp_path / "nothing": "no such file or folder",
           tmp_path: "not an HF VideoMAE folder"}
    for source, message in bad.items():
        capsys.readouterr()
        assert main(["import", "--weights", str(source), "--out", str(tmp_path / "other")]) == 2, source
        assert message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def _official_finetuned(classifier) -> dict[str, torch.Tensor]:
    """An HF VideoMAEForVideoClassification's weights under the official fine-tuning code's names
    (modeling_finetune.VisionTransformer: patch_embed, blocks.N, fc_norm, head; q and v biases apart)."""
    sd = hf_to_official({k: v for k, v in classifier.state_dict().items() if k.startswith("videomae.")})
    sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    sd.update({k.replace("classifier.", "head."): v for k, v in classifier.state_dict().items()
               if k.startswith(("classifier.", "fc_norm."))})
    return sd


def test_official_finetuned_checkpoint_loads_its_encoder(tmp_path, capsys):
    """An official fine-tuned checkpoint (the classifier, under 'module') imports as its encoder: every
    layer's output equals HF's port of the same classifier; the decoder keeps its init and is named, the
    head and fc_norm are named as unused; a learned position table and a missing encoder layer are refused."""
    import json

    from bwssl_core.cli import main
    from bwssl_core.train import load_run

    classifier = transformers.VideoMAEForVideoClassification(_hf_model().config).eval()
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = _official_finetuned(classifier)
    assert {"patch_embed.proj.weight", "blocks.2.attn.q_bias", "fc_norm.weight", "head.weight"} <= set(sd)
    path = tmp_path / "videomae_finetuned.pth"
    torch.save({"module": sd}, path)
    sizes = ["--img-size", "32", "--num-frames", "4", "--num-heads", "3"]
    assert main(["import", "--weights", str(path), "--out", str(tmp_path / "run"), *sizes]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, config = load_run(tmp_path / "run")
    assert printed["unused"] == config["imported"]["unused"] == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                                                "head.weight"]
    missing = config["imported"]["not_in_weights"]
    assert missing and all(k.startswith("decoders.0.") for k in missing)
    assert model.cfg.dec_norm is False and model.cfg.depth == 3  # mean pooling: no final norm per token
    video = torch.randn(2, 4, 3, 32, 32)  # HF layout
    with torch.no_grad():
        hf_out = classifier.videomae(pixel_values=video, output_hidden_states=True).hidden_states[1:]
        ours = model.forward_intermediates(from_hf_pixel_values(video))
    assert len(ours) == len(hf_out) == 3
    for a, b in zip(ours, hf_out):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    bad = {"pos_embed": (dict(sd, pos_embed=torch.zeros(1, 32, 48)), "learned position embedding (pos_embed)"),
           "layer": ({k: v for k, v in sd.items() if not k.startswith("blocks.1.mlp")},
                     "missing ['stages.0.layers.1.mlp"),
           "heads": (sd, "no preset has width 48 and depth 3: pass num_heads")}
    for name, (weights, message) in bad.items():
        torch.save({"module": weights}, tmp_path / f"{name}.pth")
        flags = [] if name == "heads" else sizes
        assert main(["import", "--weights", str(tmp_path / f"{name}.pth"), "--out", str(tmp_path / name), *flags]) == 2
        assert message in capsys.readouterr().err, name
        assert not (tmp_path / name).exists()


@pytest.mark.timeout(400)
def test_notebooks_take_an_imported_run_of_another_clip_size(tmp_path, synth_data, monkeypatch, capsys):
    """Notebook 02 probes imported weights read at their own clip size beside the study's runs, with CKA against
    the reference over the same videos, and keeps them out of the claims; notebook 03, which shows one clip
    through every run, refuses them by name; `bwssl analyze --vs` compares across clip sizes too."""
    import json
    import shutil

    import papermill
    from notebook_fixtures import jupyter_env, notebook_ipynb

    from bwssl_core import claims
    from bwssl_core.cli import main
    from bwssl_core.study import results_path, run_paths
    from bwssl_core.train import load_run

    study = tmp_path / "study"
    for name, extra in (("e2e", []), ("bwssl-k2", ["--blocks", "2"])):
        assert main(["pretrain", "--preset", "tiny", "--data", str(synth_data), "--steps", "2", "--batch-size", "4",
                     "--workers", "0", "--device", "cpu", "--out", str(study / "runs" / name), *extra]) == 0
    hf = _hf_model(use_mean_pooling=False)  # 3 layers at 32 px: imported at 48 px, a 6 x 6 grid
    hf.save_pretrained(tmp_path / "hf")
    imported = tmp_path / "elsewhere" / "videomae"
    assert main(["import", "--weights", str(tmp_path / "hf"), "--out", str(imported), "--img-size", "48"]) == 0
    assert load_run(imported)[0].cfg.img_size == 48
    other_e2e = str(tmp_path / "other-study" / "e2e")  # another study's E2E: labelled by its path beside ours
    shutil.copytree(study / "runs" / "e2e", other_e2e)
    assert list(run_paths(study, [other_e2e, "e2e", str(imported)])) == [other_e2e, "e2e", "videomae"]
    with pytest.raises(ConfigError, match="names a run folder given before it"):
        run_paths(study, [str(imported), str(tmp_path / "elsewhere" / ".." / "elsewhere" / "videomae")])
    with pytest.raises(ConfigError, match="'e2f' has no run at"):
        run_paths(study, ["e2e", "e2f"])

    for var, value in jupyter_env(tmp_path / "jupyter").items():
        monkeypatch.setenv(var, value)
    runs = ["e2e", "bwssl-k2", str(imported), other_e2e]

    def execute(name, **parameters):
        return papermill.execute_notebook(
            str(notebook_ipynb(name, tmp_path / f"{name}.ipynb")), str(tmp_path / f"{name}-out.ipynb"),
            cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
            parameters={"study": str(study), "data": str(synth_data), "runs": runs, "device": "cpu", **parameters})

    execute("02_probe", poolings=["mean", "slices"], attentive_layers=[], cka_batch=8, families=["motion", "position"])
    out = json.loads(results_path(study, "02_probe").read_text())
    assert out["blocks"] == {"e2e": 1, "bwssl-k2": 2, "videomae": 1, other_e2e: 1} and set(out["probe"]) == set(
        out["blocks"])
    assert out["probe"][other_e2e] == out["probe"]["e2e"]  # the same weights, probed alike
    ours = out["probe"]["videomae"]
    assert len(ours["trained"]["mean"]["motion"]["acc"]) == 3  # its own depth, beside the tiny runs' 4
    assert len(ours["random_init"]["slices"]["position"]["acc"]) == 3  # its own architecture's control
    across = out["analysis"]["videomae"]["cka_across"]  # its layers against E2E's, over the same 16 videos
    assert (len(across), len(across[0])) == (3, 4) and all(0 < v <= 1 + 1e-6 for row in across for v in row)
    said = claims.summary(out["probe"], out["analysis"], "e2e", out["val_clips"], blocks=out["blocks"])
    assert {line["run"] for line in said["lines"]} == {"bwssl-k2"}  # the claims compare BWSSL with E2E only
    assert "videomae" in {line["run"] for line in claims.summary(out["probe"], out["analysis"], "e2e",
                                                                   out["val_clips"])["lines"]}

    with pytest.raises(papermill.PapermillExecutionError, match="notebook 03 shows runs of one clip size"):
        execute("03_patches", attention_clips=2)
    capsys.readouterr()
    assert main(["analyze", "--run", str(study / "runs" / "e2e"), "--vs", str(imported), "--data", str(synth_data),
                 "--batch-size", "8", "--device", "cpu"]) == 0
    cross = json.loads((study / "runs" / "e2e" / "analyze.json").read_text())["cka_across"]
    assert (len(cross), len(cross[0])) == (4, 3)
    # the same CKA as the notebook's, transposed
    torch.testing.assert_close(torch.tensor(cross), torch.tensor(across).T, atol=1e-5, rtol=0)
