import pytest
import torch

from latentseg.models.blocks import (
    CrossAttention,
    Downsample,
    DualCrossAttention,
    ResBlock,
    SelfAttention,
    Upsample,
    as_tuple,
    timestep_embedding,
)
from latentseg.models.denoiser import Denoiser
from latentseg.models.encoders import ImageEncoder, LabelDecoder, LabelEncoder, standardize


def spatial(dims, n):
    return (n,) * dims


@pytest.mark.parametrize("dims", [2, 3])
def test_block_shapes(dims):
    x = torch.randn(2, 8, *spatial(dims, 8))
    emb = torch.randn(2, 32)
    assert ResBlock(dims, 8, 16, 32)(x, emb).shape == (2, 16, *spatial(dims, 8))
    assert ResBlock(dims, 8, 8)(x).shape == x.shape
    assert SelfAttention(8, 2)(x).shape == x.shape
    assert Downsample(dims, 8, 12)(x).shape == (2, 12, *spatial(dims, 4))
    assert Upsample(dims, 8, 4)(x).shape == (2, 4, *spatial(dims, 16))


def test_anisotropic_strides():
    x = torch.randn(1, 4, 16, 16, 8)
    down = Downsample(3, 4, 4, (2, 2, 1))
    assert down(x).shape == (1, 4, 8, 8, 8)
    assert Upsample(3, 4, 4, (2, 2, 1))(down(x)).shape == x.shape
    enc = ImageEncoder(3, 1, 6, [4, 8, 8], [(2, 2, 1), (2, 2, 2)], attention_stages=1, num_heads=2)
    assert enc(torch.randn(1, 1, 16, 16, 8)).shape == (1, 6, 4, 4, 4)
    with pytest.raises(ValueError, match="3 entries"):
        as_tuple((2, 2), 3)


@pytest.mark.parametrize("dims", [2, 3])
def test_encoders_decoder_denoiser_shapes(dims):
    size, classes, k = 32, 3, 4
    strides = [2, 2, 2, 2]
    image = torch.randn(2, 1, *spatial(dims, size))
    onehot = torch.nn.functional.one_hot(torch.randint(0, classes, (2, *spatial(dims, size))), classes)
    onehot = onehot.movedim(-1, 1).float()
    z_image = ImageEncoder(dims, 1, 6, [4, 8, 8, 16, 16], strides)(image)
    z_label = LabelEncoder(dims, classes, k, [4, 4, 8, 8, 8], strides)(onehot)
    assert z_image.shape == (2, 6, *spatial(dims, 2))
    assert z_label.shape == (2, k, *spatial(dims, 2))
    logits = LabelDecoder(dims, k, classes, [4, 8, 8, 16, 16], strides)(z_label)
    assert logits.shape == (2, classes, *spatial(dims, size))
    out = Denoiser(dims, k, 6, [16, 32], num_heads=2)(z_label, torch.tensor([0, 999]), {"z_image": z_image})
    assert out.shape == z_label.shape


def test_label_latent_is_standardized_per_sample():
    onehot = torch.nn.functional.one_hot(torch.randint(0, 2, (3, 32, 32)), 2).movedim(-1, 1).float()
    z = LabelEncoder(2, 2, 4, [4, 4, 8], [2, 2])(onehot)
    flat = z.reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(standardize(5 * flat + 2), standardize(flat), atol=1e-4, rtol=0)


def test_denoiser_handles_odd_latent_sizes():
    z = torch.randn(1, 2, 5, 3)
    out = Denoiser(2, 2, 3, [8, 16], num_heads=2)(z, torch.tensor([10]), {"z_image": torch.randn(1, 3, 5, 3)})
    assert out.shape == z.shape


def test_timestep_embedding_is_distinct_per_t():
    emb = timestep_embedding(torch.tensor([0, 1, 500, 999]), 33)
    assert emb.shape == (4, 33)
    assert torch.cdist(emb, emb).fill_diagonal_(1).min() > 0.1


def test_width_count_is_checked():
    with pytest.raises(ValueError, match="widths"):
        ImageEncoder(2, 1, 4, [4, 8], [2, 2])


@pytest.mark.parametrize("dims", [2, 3])
def test_cross_attention_over_maps_and_padded_tokens(dims):
    torch.manual_seed(0)
    x = torch.randn(2, 16, *([6] * dims))
    attn = CrossAttention(16, 8, num_heads=4)
    assert attn(x, torch.randn(2, 8, *([3] * dims))).shape == x.shape
    tokens = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out = attn(x, tokens, pad)
    # padding tokens are ignored: changing them changes nothing
    tokens2 = tokens.clone()
    tokens2[1, 2:] = torch.randn(3, 8)
    assert torch.allclose(out, attn(x, tokens2, pad), atol=1e-6)
    assert not torch.allclose(out[0], attn(x, tokens2 + 1, pad)[0])


@pytest.mark.parametrize("dims", [2, 3])
def test_dual_cross_attention_injects_the_condition(dims):
    torch.manual_seed(0)
    dca = DualCrossAttention(dims, 16, 8, num_heads=4)
    h = torch.randn(1, 16, *([4] * dims))
    cond = torch.randn(1, 8, *([8] * dims))  # pooled to h's grid
    out = dca(h, cond)
    assert out.shape == h.shape
    assert not torch.allclose(out, dca(h, cond + torch.randn_like(cond)))
