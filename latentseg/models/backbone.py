"""A pretrained 2D DDPM UNet as a frozen feature extractor (001 section 2.1, after Baranchuk et al.).

The backbone is a diffusers `UNet2DModel` that predicts eps: one trained by `latentseg
pretrain-ddpm`, or any a user has in a local folder. Its decoder blocks are numbered as in the
guided-diffusion UNet the paper uses (`output_blocks`): block k is the k-th residual block of the
decoder counted from the lowest resolution, with the attention that follows it and, for the last
block of a level, the upsampling. With layers_per_block=2 and six levels, as in the 256x256
guided-diffusion model, there are 18 blocks and the paper's B = {6, 8, 12, 16} are valid ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentseg.diffusion import DiffusionSchedule
from latentseg.errors import LatentSegError, one_line

CONFIG_NAME = "config.json"  # diffusers' file name for a model's settings


def default_unet_config(in_channels: int, sample_size: int = 256) -> dict[str, Any]:
    """The guided-diffusion 256x256 layout (channel multipliers 1,1,2,2,4,4; two residual blocks
    per level; attention at the two lowest resolutions) at a width a CPU can train."""
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": [32, 32, 64, 64, 128, 128],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D"] * 2,
        "up_block_types": ["AttnUpBlock2D"] * 2 + ["UpBlock2D"] * 4,
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    }


def build_unet(unet_config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(unet_config)


def load_backbone(path: str | Path) -> nn.Module:
    """A diffusers `UNet2DModel` from a local folder (config.json + weights), in eval mode."""
    from diffusers import UNet2DModel

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise LatentSegError(f"{folder}: not a diffusers UNet2DModel folder (no {CONFIG_NAME})")
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LatentSegError(f"{folder / CONFIG_NAME}: not valid JSON ({one_line(err)})") from err
    kind = raw.get("_class_name") if isinstance(raw, dict) else None
    if kind != "UNet2DModel":
        raise LatentSegError(f"{folder}: holds a {kind or 'model of unknown class'}, not a diffusers UNet2DModel")
    try:
        # safetensors only: a diffusion_pytorch_model.bin is a pickle, and nothing is unpickled
        unet = UNet2DModel.from_pretrained(
            str(folder), local_files_only=True, low_cpu_mem_usage=False, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise LatentSegError(f"{folder}: cannot load the UNet2DModel ({one_line(err)[:300]})") from err
    return unet.eval()


def decoder_blocks(unet: nn.Module) -> list[nn.Module]:
    """The module whose output is decoder block k, for k = 0, 1, ... (see the module docstring)."""
    blocks = []
    for up in unet.up_blocks:
        attentions = getattr(up, "attentions", None)
        for j, resnet in enumerate(up.resnets):
            last = j == len(up.resnets) - 1
            if last and getattr(up, "upsamplers", None):
                blocks.append(up.upsamplers[-1])
            elif attentions is not None and j < len(attentions):
                blocks.append(attentions[j])
            else:
                blocks.append(resnet)
    return blocks


def block_channels(unet: nn.Module) -> list[int]:
    """Channels of each decoder block's output."""
    widths = []
    for up in unet.up_blocks:
        widths += [up.resnets[-1].out_channels] * len(up.resnets)
    return widths


def check_feature_settings(unet: nn.Module, blocks: list[int], timesteps: list[int], num_timesteps: int) -> None:
    valid = len(decoder_blocks(unet))
    bad = [b for b in blocks if not 0 <= b < valid]
    if not blocks or bad:
        raise LatentSegError(
            f"feature block ids {bad or blocks} are not valid for this UNet; valid ids are 0..{valid - 1} "
            f"({len(unet.up_blocks)} decoder levels of {len(unet.up_blocks[0].resnets)} blocks)"
        )
    bad_t = [t for t in timesteps if not 0 <= t < num_timesteps]
    if not timesteps or bad_t:
        raise LatentSegError(f"feature timesteps {bad_t or timesteps} must lie in [0, {num_timesteps})")


class FeatureExtractor(nn.Module):
    """Frozen UNet activations of the chosen decoder blocks at the chosen noise levels.

    For each t: x_t = q_sample(x_0, t) (001 Eq. 1, closed form), one UNet pass, and the outputs
    of the chosen blocks, each at its own resolution (upsampling is left to the caller, which
    can attend to text first at the small size).
    """

    def __init__(self, unet: nn.Module, blocks: list[int], timesteps: list[int], schedule: DiffusionSchedule):
        super().__init__()
        check_feature_settings(unet, blocks, timesteps, schedule.num_timesteps)
        self.unet = unet.requires_grad_(False).eval()
        self.blocks, self.timesteps, self.schedule = list(blocks), list(timesteps), schedule
        modules = decoder_blocks(unet)
        self._captured: dict[int, torch.Tensor] = {}
        for b in self.blocks:
            modules[b].register_forward_hook(self._capture(b))
        widths = block_channels(unet)
        self.channels = [widths[b] for b in self.blocks]

    def _capture(self, block: int):
        def hook(module, inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            # diffusers' attention blocks return channels-last strides; GroupNorm's CPU backward on
            # such an input that needs no gradient crashes torch 2.13 (segfault), so copy to NCHW
            self._captured[block] = tensor.contiguous()

        return hook

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        self.unet.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
        """features[i][j]: block self.blocks[j] at timestep self.timesteps[i], (B, C_j, h_j, w_j)."""
        features = []
        for t in self.timesteps:
            tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            self._captured.clear()
            self.unet(self.schedule.q_sample(x0, tt, noise), tt)
            features.append([self._captured[b] for b in self.blocks])
        return features


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W up to a multiple of the UNet's total downsampling; returns the crop back."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, (h, w)
