"""Load official VideoMAE (MCG-NJU) and HF transformers VideoMAEForPreTraining weights.

One canonical path: HF names -> official names -> ours. Official fine-tuned checkpoints (the classifier's
VisionTransformer: patch_embed, blocks, norm or fc_norm, head) are renamed onto the pretraining encoder's
names first; their decoder keeps its initialisation. HF stores separate query/key/value
projections (q and v biases as `query.bias`/`value.bias`, or `q_bias`/`v_bias` in older versions);
the official code and ours fuse the weights into one qkv matrix with separate q and v biases. Both use VideoMAE's 1-D sin-cos table, so converted configs
set pos_embed="1d". HF takes pixel_values as (B, T, C, H, W); ours, like the official code, take
(B, C, T, H, W): see `from_hf_pixel_values`.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch

from .config import PRESETS, ConfigError, ModelConfig
from .model import VideoMAE

_HF_LAYER = {  # HF suffix within a layer -> official suffix
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}


def mlp_ratio(hidden: int, width: int) -> float:
    """The ratio whose MLP width int(width x ratio) is `hidden` (hidden / width alone can fall a hair short:
    704 x (3840 / 704) = 3839.99...)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


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
                  mlp_ratio=mlp_ratio(c.intermediate_size, c.hidden_size), norm_eps=c.layer_norm_eps, pos_embed="1d",
                  partition=(c.num_hidden_layers,), dec_dim=c.decoder_hidden_size,
                  dec_depth=c.decoder_num_hidden_layers, dec_heads=c.decoder_num_attention_heads,
                  dec_norm=not c.use_mean_pooling, norm_target=c.norm_pix_loss)
    cfg = ModelConfig(**{**values, **overrides}).validate()
    if int(cfg.dec_dim * cfg.mlp_ratio) != c.decoder_intermediate_size:
        raise ConfigError(f"decoder_intermediate_size={c.decoder_intermediate_size}: the decoder's MLP here is "
                          f"{int(cfg.dec_dim * cfg.mlp_ratio)} wide (decoder width x the encoder's MLP ratio, "
                          "as in VideoMAE)")
    return cfg


def finetune_to_official(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An official fine-tuned state dict (patch_embed, blocks, norm; fc_norm, head) -> the pretraining
    encoder's names, and the keys that have no place in the encoder: the classifier head and fc_norm, the
    norm after mean pooling (the per-layer features are taken before it)."""
    encoder = {f"encoder.{k}": v for k, v in sd.items() if k.startswith(("patch_embed.", "blocks.", "norm."))}
    return encoder, sorted(k for k in sd if f"encoder.{k}" not in encoder)


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """How many layers `prefix`.N. the state dict holds (0 if none)."""
    return 1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))),
                   default=-1)


def config_from_official(sd: dict[str, torch.Tensor], **overrides) -> ModelConfig:
    """Infer a config from official weights; heads come from the preset of the same width and depth, and so
    does the decoder of weights that have none (a fine-tuned encoder)."""
    D, C, t, p, _ = sd["encoder.patch_embed.proj.weight"].shape
    depth, dec_depth = _count(sd, "encoder.blocks"), _count(sd, "decoder.blocks")
    preset = next((v for v in PRESETS.values() if v["embed_dim"] == D and v["depth"] == depth), None)
    needed = {"num_heads", "dec_heads"} if dec_depth else {"num_heads"}
    if preset is None and not needed <= set(overrides):
        raise ConfigError(f"no preset has width {D} and depth {depth}: pass {' and '.join(sorted(needed))}")
    if dec_depth:
        decoder = dict(dec_dim=sd["encoder_to_decoder.weight"].shape[0], dec_depth=dec_depth,
                       dec_heads=preset and preset["dec_heads"])
    elif preset:  # no decoder in the weights: it keeps its initialisation, at the preset's size
        decoder = {k: preset[k] for k in ("dec_dim", "dec_depth", "dec_heads")}
    else:  # or at half the encoder's width and heads
        decoder = dict(dec_dim=D // 2, dec_depth=1, dec_heads=max(1, overrides["num_heads"] // 2))
    values = dict(in_chans=C, tubelet_size=t, patch_size=p, embed_dim=D, depth=depth,
                  mlp_ratio=mlp_ratio(sd["encoder.blocks.0.mlp.fc1.weight"].shape[0], D), pos_embed="1d",
                  partition=(depth,), dec_norm="encoder.norm.weight" in sd,
                  num_heads=preset and preset["num_heads"], **decoder)
    return ModelConfig(**{**values, **overrides}).validate()


def load_converted(model: VideoMAE, sd: dict[str, torch.Tensor], strict: bool = True,
                   decoder_optional: bool = False) -> VideoMAE:
    """Load an official-named state dict into `model`, naming any missing or unexpected keys. With
    decoder_optional, decoder weights may be missing (they keep their initialisation); encoder ones not."""
    result = model.load_state_dict(official_to_bwssl(sd, model.cfg), strict=False)
    missing = [k for k in result.missing_keys if not (decoder_optional and k.startswith("decoders."))]
    if strict and (missing or result.unexpected_keys):
        raise ConfigError(f"weights do not fit the model: missing {missing[:8]}, "
                          f"unexpected {result.unexpected_keys[:8]}")
    return model


def from_hf(hf_model) -> VideoMAE:
    """Our E2E model with the weights of a transformers VideoMAEForPreTraining."""
    model = VideoMAE(config_from_hf(hf_model.config))
    return load_converted(model, hf_to_official(hf_model.state_dict()))


def load_official(path: str | Path, **overrides) -> tuple[VideoMAE, list[str], list[str]]:
    """Our E2E model from an official VideoMAE checkpoint (a .pth with a 'model' or 'module' dict): a
    pretraining one (encoder and decoder), or a fine-tuned one (the classifier: its encoder loads, the decoder
    keeps its initialisation). Returns the model, the names (ours) of the weights the file did not hold, and
    the file's keys left unused (a classifier's head and fc_norm).

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
    if not isinstance(sd, dict) or not {"encoder.patch_embed.proj.weight", "patch_embed.proj.weight"} & set(sd):
        raise ConfigError(f"{path}: not an official VideoMAE checkpoint (expected a state dict with "
                          "'encoder.patch_embed.proj.weight', pretraining, or 'patch_embed.proj.weight', fine-tuned)")
    learned = [k for k in sd if k.endswith("pos_embed")]
    if learned:
        raise ConfigError(f"{path}: holds a learned position embedding ({learned[0]}): the encoder here uses "
                          "VideoMAE's fixed sin-cos table")
    sd, unused = finetune_to_official(sd) if "patch_embed.proj.weight" in sd else (sd, [])
    model = VideoMAE(config_from_official(sd, **overrides))
    load_converted(model, sd, decoder_optional="encoder_to_decoder.weight" not in sd)  # an encoder alone
    ours = official_to_bwssl(sd, model.cfg)
    return model, [k for k in model.state_dict() if k not in ours], unused


def load_hf_folder(folder: str | Path, **overrides) -> tuple[VideoMAE, list[str], list[str]]:
    """Our E2E model from an HF transformers VideoMAE folder (`save_pretrained`: config.json and the
    weights), the HF names of the weights the folder did not hold, and those of its weights left unused
    (a classifier's head and fc_norm). A classification or bare-encoder folder has no decoder: the encoder
    loads and the decoder keeps its initialisation (those names); a missing encoder weight is an error."""
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
    return load_converted(model, hf_to_official(hf.state_dict())), missing, sorted(info["unexpected_keys"])


def import_run(weights: str | Path, out: str | Path, overwrite: bool = False, **overrides) -> dict:
    """Write official or HF VideoMAE weights as a run folder (config.json, checkpoint.pt) that `bwssl
    probe`, `bwssl analyze` and `train.load_run` take like a trained run. `weights`: an official
    pretraining or fine-tuned checkpoint (a file) or an HF folder. Returns the config written, whose
    "imported" part names the source, its files' SHA-256, the weights it did not hold and those unused."""
    from .config import TrainConfig, to_dict
    from .io import save_checkpoint, save_json
    from .train import claim_folder

    weights, out = Path(weights), Path(out)
    if weights.is_file():
        (model, missing, unused), kind, files = load_official(weights, **overrides), "official", [weights]
    elif weights.is_dir():
        (model, missing, unused), kind = load_hf_folder(weights, **overrides), "hf"
        files = sorted(p for p in weights.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    else:
        raise ConfigError(f"{weights}: no such file or folder (expected an official VideoMAE checkpoint "
                          "or an HF transformers folder)")
    claim_folder(out, overwrite, resumable=False)
    config = {"model": to_dict(model.cfg), "train": to_dict(TrainConfig()), "world_size": 1,
              "imported": {"weights": str(weights), "format": kind, "not_in_weights": missing, "unused": unused,
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
