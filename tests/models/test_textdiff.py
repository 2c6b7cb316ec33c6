"""TextDiff (001): the frozen DDPM UNet's decoder blocks, the head, and training / predicting with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from latentseg.cli import main
from latentseg.config import ModelConfig, SampleConfig
from latentseg.diffusion import DiffusionSchedule
from latentseg.errors import LatentSegError
from latentseg.models.backbone import FeatureExtractor, check_feature_settings, decoder_blocks, load_backbone
from latentseg.models.textdiff import TextDiffSegmenter
from latentseg.pretrain import pretrain_ddpm
from latentseg.text import TextEmbedding

TINY_UNET = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}
TINY_TEXTDIFF = [
    "--mode",
    "textdiff",
    "train.steps=8",
    "train.batch_size=2",
    "train.val_every=4",
    "train.checkpoint_every=4",
    "data.val_fraction=0.2",
    "model.feature_blocks=[1,3,5]",
    "model.feature_timesteps=[50,150]",
    "model.feature_channels=8",
]


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """A diffusers UNet2DModel saved to a local folder, as a user's own backbone would be."""
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    UNet2DModel.from_config(TINY_UNET).save_pretrained(str(folder))
    return folder


def test_decoder_blocks_follow_the_unet_levels(tiny_unet):
    """Block 2i+1 (last of level i, with its upsampling) is what diffusers' up_blocks[i] returns."""
    unet = load_backbone(tiny_unet)
    blocks = decoder_blocks(unet)
    assert len(blocks) == 6  # 3 levels x (layers_per_block + 1)
    level_outputs, block_outputs = {}, {}
    for i, up in enumerate(unet.up_blocks):
        up.register_forward_hook(lambda m, a, out, i=i: level_outputs.__setitem__(i, out))
    for k, module in enumerate(blocks):
        module.register_forward_hook(lambda m, a, out, k=k: block_outputs.__setitem__(k, out))
    with torch.no_grad():
        unet(torch.randn(2, 1, 32, 32), torch.tensor([10, 500]))
    for i in range(3):
        assert torch.equal(block_outputs[2 * i + 1], level_outputs[i])
    assert [block_outputs[k].shape[-1] for k in range(6)] == [8, 16, 16, 32, 32, 32]


def test_feature_extractor_shapes_and_noise(tiny_unet):
    unet = load_backbone(tiny_unet)
    extractor = FeatureExtractor(unet, [1, 3, 4], [50, 250], DiffusionSchedule("linear", 1000))
    x = torch.randn(2, 1, 32, 32)
    features = extractor(x, torch.Generator().manual_seed(0))
    assert len(features) == 2 and [f.shape[1:] for f in features[0]] == [(16, 16, 16), (16, 32, 32), (8, 32, 32)]
    again = extractor(x, torch.Generator().manual_seed(0))
    other = extractor(x, torch.Generator().manual_seed(1))
    assert torch.equal(features[1][2], again[1][2]) and not torch.equal(features[1][2], other[1][2])
    assert not any(p.requires_grad for p in extractor.parameters())


def test_bad_feature_settings_are_named(tiny_unet, tmp_path):
    unet = load_backbone(tiny_unet)
    with pytest.raises(LatentSegError, match=r"block ids \[6, 12\] are not valid.*valid ids are 0..5"):
        check_feature_settings(unet, [1, 6, 12], [50], 1000)
    with pytest.raises(LatentSegError, match=r"timesteps \[1000, -1\] must lie in \[0, 1000\)"):
        check_feature_settings(unet, [1], [50, 1000, -1], 1000)
    with pytest.raises(LatentSegError, match="not a diffusers UNet2DModel folder"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(LatentSegError, match="holds a AutoencoderKL, not a diffusers UNet2DModel"):
        load_backbone(tmp_path)


def _head(tiny_unet, fusion: str) -> TextDiffSegmenter:
    config = ModelConfig(mode="textdiff", num_classes=3, text_fusion=fusion, text_dim=12 if fusion != "none" else 0)
    config.backbone_config = dict(load_backbone(tiny_unet).config)
    config.feature_blocks, config.feature_timesteps, config.feature_channels = [1, 3], [50], 8
    return TextDiffSegmenter(config)


def test_only_the_head_trains_and_text_changes_the_output(tiny_unet):
    model = _head(tiny_unet, "attention")
    unet_before = {k: v.clone() for k, v in model.features.unet.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("features.") for n in trainable)
    text = TextEmbedding(torch.randn(2, 5, 12), torch.zeros(2, 5, dtype=torch.bool), torch.randn(2, 12))
    yy, xx = torch.meshgrid(torch.arange(30), torch.arange(30), indexing="ij")
    label = torch.stack([((yy - 9) ** 2 + (xx - 12) ** 2 < 40), ((yy - 20) ** 2 + (xx - 17) ** 2 < 60)])[:, None]
    label = label.long() * torch.tensor([1, 2])[:, None, None, None]  # a disc of class 1, one of class 2
    image = 2.0 * label.float() + 0.1 * torch.randn(2, 1, 30, 30)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        batch = {"image": image, "label": label, "text": text}
        loss = model.segmentation_losses(batch, 2.0, generator=torch.Generator().manual_seed(0)).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(unet_before[k], v) for k, v in model.features.unet.state_dict().items())
    probs = model.sample(image, SampleConfig(num_samples=3), text, torch.Generator().manual_seed(0))
    assert probs.shape == (3, 2, 3, 30, 30)  # windows not a multiple of 4 are padded and cropped back
    other = TextEmbedding(torch.randn(2, 5, 12), text.padding, torch.randn(2, 12))
    moved = model.sample(image, SampleConfig(num_samples=1), other, torch.Generator().manual_seed(0))
    assert not torch.allclose(probs[0], moved[0])
    with pytest.raises(ValueError, match="trained with text"):
        model.sample(image, SampleConfig(num_samples=1))
    with pytest.raises(ValueError, match="trained without text"):
        _head(tiny_unet, "none").sample(image, SampleConfig(num_samples=1), text)


def test_classifier_equals_concatenating_the_upsampled_features(tiny_unet):
    """`classify` is the classifier on torch.cat of every bilinearly upsampled block, done cheaper."""
    model = _head(tiny_unet, "none")
    g = torch.Generator().manual_seed(0)
    fused = [torch.randn(2, 8, n, n, generator=g) for n in (4, 8, 8, 16, 32, 4)]
    concatenated = torch.cat([F.interpolate(f, size=(32, 32), mode="bilinear") for f in fused], dim=1)
    first = model.classifier[0]
    model.classifier[0] = torch.nn.Conv2d(48, first.out_channels, 1)
    expected = model.classifier(concatenated)
    assert torch.allclose(model.classify(fused, torch.Size((32, 32))), expected, atol=1e-5)


def test_feature_cache_reuses_each_images_features(tiny_unet, monkeypatch):
    model = _head(tiny_unet, "none")
    model.cache_features(max_megabytes=100)
    calls = []
    original = model.features.forward
    monkeypatch.setattr(model.features, "forward", lambda x, g=None: calls.append(len(x)) or original(x, g))
    images = torch.randn(3, 1, 16, 16)
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    model.train()
    first = model.logits(images[:2])
    assert model.logits(images[:2]).equal(first) and calls == [1, 1]  # one pass per new image, then none
    model.logits(images[1:])
    assert calls == [1, 1, 1]
    model.segmentation_losses(
        {"image": images[[2, 0]], "label": label}, 2.0
    ).total.backward()  # cached features still train the head
    assert calls == [1, 1, 1] and model.classifier[0].weight.grad is not None
    model.eval()
    model.logits(images[:1])  # inference always draws fresh noise
    assert calls == [1, 1, 1, 1]
    small = _head(tiny_unet, "none")
    small.cache_features(max_megabytes=1e-6)  # over the limit: computed every time, not kept
    small.train()
    small.logits(images[:1])
    assert small._cache == {}


def test_pretrain_ddpm_learns_and_writes_a_loadable_unet(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        yy, xx = np.mgrid[:48, :48]
        disc = ((yy - rng.integers(12, 36)) ** 2 + (xx - rng.integers(12, 36)) ** 2 < 80) * 200 + 20
        Image.fromarray(disc.astype(np.uint8)).save(images / f"case{i}.png")
    out = pretrain_ddpm(tmp_path, tmp_path / "ddpm", size=32, steps=120, batch_size=4, lr=2e-3, unet_config=TINY_UNET)
    history = json.loads((out / "pretrain_log.json").read_text())
    assert history["steps_done"] == 120 and history["loss"][-1] < 0.6 * history["loss"][0]
    assert list(load_backbone(out).config.block_out_channels) == [8, 16, 16]
    with pytest.raises(LatentSegError, match="must be a multiple of 4"):
        pretrain_ddpm(tmp_path, tmp_path / "bad", size=30, steps=1, unet_config=TINY_UNET)
    assert not (tmp_path / "bad").exists()


def test_textdiff_train_predict_cli(tmp_path, data2d, tiny_unet):
    out, preds = tmp_path / "model", tmp_path / "preds"
    train = ["train", "--data", str(data2d["train"]), "--out", str(out), "--backbone", str(tiny_unet)]
    assert main([*train, *TINY_TEXTDIFF, "model.text_fusion=attention"]) == 0
    config = json.loads((out / "config.json").read_text())["model"]
    plan = json.loads((out / "plans.json").read_text())["model"]  # what training derived
    assert config["mode"] == "textdiff" and plan["backbone_config"]["block_out_channels"] == [8, 16, 16]
    saved = load_file(str(out / "model.safetensors"))
    original = load_backbone(tiny_unet).state_dict()
    assert all(torch.equal(saved[f"features.unet.{k}"], v) for k, v in original.items())  # frozen
    args = ["predict", "--model", str(out), "--input", str(data2d["test"]), "--output", str(preds)]
    assert main([*args, "--samples", "2"]) == 0
    assert len(list(preds.glob("*_std.png"))) == 3 and len(list(preds.glob("*_overlay.png"))) == 3
    assert main([*args[:-1], str(tmp_path / "p2"), "--sampler", "staged"]) == 2  # no staged sampler here


def test_textdiff_refuses_bad_setups(tmp_path, data2d, data3d, tiny_unet, capsys):
    base = ["train", "--data", str(data2d["train"]), "--out", str(tmp_path / "m")]
    assert main([*base, *TINY_TEXTDIFF]) == 2
    assert "needs model.backbone=FOLDER" in capsys.readouterr().err
    assert main([*base, "--backbone", str(tiny_unet), *TINY_TEXTDIFF, "model.feature_blocks=[1,9]"]) == 2
    assert "valid ids are 0..5" in capsys.readouterr().err
    assert main([*base, "--backbone", str(tmp_path), *TINY_TEXTDIFF]) == 2
    assert "not a diffusers UNet2DModel folder" in capsys.readouterr().err
    three_d = ["train", "--data", str(data3d["train"]), "--out", str(tmp_path / "m3"), "--backbone", str(tiny_unet)]
    assert main([*three_d, *TINY_TEXTDIFF]) == 2
    assert "needs 2D images" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m3").exists()
