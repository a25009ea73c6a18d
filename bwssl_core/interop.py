"""Load official VideoMAE (MCG-NJU) and HF transformers VideoMAEForPreTraining weights.

One canonical path: HF names -> official names -> ours. HF stores separate query/key/value
projections (q and v biases as `query.bias`/`value.bias`, or `q_bias`/`v_bias` in older versions);
the official code and ours fuse the weights into one qkv matrix with separate q and v biases. Both use VideoMAE's 1-D sin-cos table, so converted configs
set pos_embed="1d". HF takes pixel_values as (B, T, C, H, W); ours, like the official code, take
(B, C, T, H, W): see `from_hf_pixel_values`.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from .config import PRESETS, ConfigError, ModelConfig
from .model import VideoMAE

_HF_LAYER = {  # HF suffix within a layer -> official suffix
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}


def from_hf_pixel_values(pixel_values: torch.Tensor) -> torch.Tensor:
    """HF's (B, T, C, H, W) -> ours (B, C, T, H, W)."""
    return pixel_values.permute(0, 2, 1, 3, 4)


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a VideoMAEForPreTraining state dict to the official code's names."""
    out, qkv = {}, {}
    for key, value in sd.items():
        key = key.replace("videomae.embeddings.patch_embeddings.projection", "encoder.patch_embed.proj")
        key = key.replace("videomae.layernorm", "encoder.norm")
        key = re.sub(r"^videomae\.encoder\.layer\.", "encoder.blocks.", key)
        key = re.sub(r"^decoder\.decoder_layers\.", "decoder.blocks.", key)
        m = re.match(r"(.*blocks\.\d+)\.attention\.attention\.(query|key|value|q_bias|v_bias)\.?(weight|bias)?$", key)
        if m:
            prefix, part, kind = m.groups()
            if part in ("q_bias", "v_bias"):
                out[f"{prefix}.attn.{part}"] = value
            elif kind == "bias":
                out[f"{prefix}.attn.{part[0]}_bias"] = value
            else:
                qkv.setdefault(prefix, {})[part] = value
            continue
        for hf, official in _HF_LAYER.items():
            key = re.sub(rf"(blocks\.\d+)\.{re.escape(hf)}\.", rf"\1.{official}.", key)
        out[key] = value
    for prefix, parts in qkv.items():
        out[f"{prefix}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def official_to_bwssl(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map official names onto a model with config `cfg` (any partition: layers by global index;
    the encoder norm and decoder go to the last block)."""
    owner = [(k, i - start) for k, (start, end) in enumerate(cfg.spans) for i in range(start, end)]
    last = len(cfg.partition) - 1
    dec = f"decoders.{0 if cfg.dec_shared else last}"
    out = {}
    for key, value in sd.items():
        m = re.match(r"encoder\.blocks\.(\d+)\.(.*)$", key)
        if m:
            k, j = owner[int(m.group(1))]
            key = f"stages.{k}.layers.{j}.{m.group(2)}"
        elif key.startswith("decoder.blocks."):
            key = key.replace("decoder.blocks.", f"{dec}.layers.")
        else:
            key = {"encoder.patch_embed.proj.weight": "stages.0.embed.proj.weight",
                   "encoder.patch_embed.proj.bias": "stages.0.embed.proj.bias",
                   "encoder.norm.weight": f"stages.{last}.norm.weight",
                   "encoder.norm.bias": f"stages.{last}.norm.bias",
                   "encoder_to_decoder.weight": f"{dec}.embed.weight",
                   "mask_token": f"{dec}.mask_token",
                   }.get(key, key.replace("decoder.", f"{dec}.", 1) if key.startswith("decoder.") else key)
        out[key] = value
    return out


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """Our config for a transformers VideoMAEConfig (one block: E2E)."""
    c = hf_config
    values = dict(img_size=c.image_size, num_frames=c.num_frames, in_chans=c.num_channels,
                  tubelet_size=c.tubelet_size, patch_size=c.patch_size, embed_dim=c.hidden_size,
                  depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                  mlp_ratio=c.intermediate_size / c.hidden_size, norm_eps=c.layer_norm_eps, pos_embed="1d",
                  partition=(c.num_hidden_layers,), dec_dim=c.decoder_hidden_size,
                  dec_depth=c.decoder_num_hidden_layers, dec_heads=c.decoder_num_attention_heads,
                  dec_norm=not c.use_mean_pooling, norm_target=c.norm_pix_loss)
    return ModelConfig(**{**values, **overrides}).validate()


def config_from_official(sd: dict[str, torch.Tensor], **overrides) -> ModelConfig:
    """Infer a config from official weights; heads come from the preset of the same width."""
    D, C, t, p, _ = sd["encoder.patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    dec_depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.blocks\.(\d+)\.", k)))
    preset = next((v for v in PRESETS.values() if v["embed_dim"] == D and v["depth"] == depth), None)
    if preset is None and not {"num_heads", "dec_heads"} <= set(overrides):
        raise ConfigError(f"no preset has width {D} and depth {depth}: pass num_heads and dec_heads")
    values = dict(in_chans=C, tubelet_size=t, patch_size=p, embed_dim=D, depth=depth,
                  mlp_ratio=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / D, pos_embed="1d",
                  partition=(depth,), dec_dim=sd["encoder_to_decoder.weight"].shape[0], dec_depth=dec_depth,
                  dec_norm="encoder.norm.weight" in sd,
                  num_heads=preset and preset["num_heads"], dec_heads=preset and preset["dec_heads"])
    return ModelConfig(**{**values, **overrides}).validate()


def load_converted(model: VideoMAE, sd: dict[str, torch.Tensor], strict: bool = True) -> VideoMAE:
    """Load an official-named state dict into `model`, naming any missing or unexpected keys."""
    result = model.load_state_dict(official_to_bwssl(sd, model.cfg), strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ConfigError(f"weights do not fit the model: missing {result.missing_keys[:8]}, "
                          f"unexpected {result.unexpected_keys[:8]}")
    return model


def from_hf(hf_model) -> VideoMAE:
    """Our E2E model with the weights of a transformers VideoMAEForPreTraining."""
    model = VideoMAE(config_from_hf(hf_model.config))
    return load_converted(model, hf_to_official(hf_model.state_dict()))


def load_official(path: str | Path, **overrides) -> VideoMAE:
    """Our E2E model from an official VideoMAE pretraining checkpoint (a .pth with a 'model' dict).

    Loads with weights_only=True; a checkpoint that needs arbitrary pickles is refused.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or not a torch file
        raise ConfigError(f"{path}: cannot load with weights_only=True ({err.__class__.__name__}: "
                          f"{str(err).splitlines()[0][:200]})") from None
    sd = obj.get("model", obj.get("module", obj)) if isinstance(obj, dict) else None
    if isinstance(sd, dict) and any(str(k).startswith("videomae.") for k in sd):
        raise ConfigError(f"{path}: HF transformers weights: pass the folder that holds them and its config.json")
    if not isinstance(sd, dict) or "encoder.patch_embed.proj.weight" not in sd:
        raise ConfigError(f"{path}: not an official VideoMAE pretraining checkpoint "
                          f"(expected a state dict with 'encoder.patch_embed.proj.weight')")
    return load_converted(VideoMAE(config_from_official(sd, **overrides)), sd)


def load_hf_folder(folder: str | Path, **overrides) -> tuple[VideoMAE, list[str]]:
    """Our E2E model from an HF transformers VideoMAE folder (`save_pretrained`: config.json and the
    weights), and the HF names of the weights the folder did not hold. A classification or bare-encoder
    folder has no decoder: the encoder loads and the decoder keeps its initialisation (those names); a
    missing encoder weight is an error."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{folder}: reading an HF transformers folder needs transformers "
                          "(pip install transformers)") from None
    try:
        hf, info = transformers.VideoMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: not an HF VideoMAE folder ({str(err).splitlines()[0][:200]})") from None
    missing = sorted(info["missing_keys"])
    encoder = [k for k in missing if k.startswith("videomae.")]
    if encoder:
        raise ConfigError(f"{folder}: encoder weights missing from the folder: {encoder[:8]}")
    model = VideoMAE(config_from_hf(hf.config, **overrides))
    return load_converted(model, hf_to_official(hf.state_dict())), missing


def import_run(weights: str | Path, out: str | Path, overwrite: bool = False, **overrides) -> dict:
    """Write official or HF VideoMAE weights as a run folder (config.json, checkpoint.pt) that `bwssl
    probe`, `bwssl analyze` and `train.load_run` take like a trained run. `weights`: an official
    pretraining checkpoint (a file) or an HF folder. Returns the config written, whose "imported" part
    names the source, its files' SHA-256 and the weights it did not hold."""
    from .config import TrainConfig, to_dict
    from .io import save_checkpoint, save_json
    from .train import claim_folder

    weights, out = Path(weights), Path(out)
    if weights.is_file():
        model, kind, missing, files = load_official(weights, **overrides), "official", [], [weights]
    elif weights.is_dir():
        (model, missing), kind = load_hf_folder(weights, **overrides), "hf"
        files = sorted(p for p in weights.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    else:
        raise ConfigError(f"{weights}: no such file or folder (expected an official VideoMAE checkpoint "
                          "or an HF transformers folder)")
    claim_folder(out, overwrite, resumable=False)
    config = {"model": to_dict(model.cfg), "train": to_dict(TrainConfig()), "world_size": 1,
              "imported": {"weights": str(weights), "format": kind, "not_in_weights": missing,
                           "sha256": {p.name: _sha256(p) for p in files}}}
    save_json(out / "config.json", config)
    save_checkpoint(out / "checkpoint.pt", {"model": model.state_dict(), "step": 0, "config": config})
    return config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
