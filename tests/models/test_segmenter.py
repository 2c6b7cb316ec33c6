import pytest
import torch

from latentseg.config import Config, ModelConfig, SampleConfig
from latentseg.data.phantoms import make_phantom
from latentseg.models import LatentSegmenter

TINY = dict(
    image_encoder_channels=[8, 16, 16, 32, 32],
    decoder_channels=[8, 16, 16, 32, 32],
    label_encoder_channels=[4, 8, 8, 16, 16],
    denoiser_channels=[16, 32],
    image_latent_channels=8,
)


def tiny_model(dims=2, **kw):
    torch.manual_seed(0)
    return LatentSegmenter(ModelConfig(spatial_dims=dims, in_channels=1, num_classes=3, **(TINY | kw)))


def untrained_but_not_zero(model):
    """The denoiser's last layer starts at zero (its output ignores the noise); give it weights."""
    torch.nn.init.normal_(model.denoiser.heads[0].out.weight, std=0.1)
    return model.eval()


def training_losses(model, image, label, generator=None, timesteps="uniform", lam=1.0, gamma=2.0, text=None):
    """The model's objective on one batch, with `train.timesteps`, `train.lambda_noise` and
    `train.gamma_dice` set as given."""
    config = Config(model=model.config)
    config.train.timesteps, config.train.lambda_noise, config.train.gamma_dice = timesteps, lam, gamma
    return model.objective(config).diffusion_losses(image, label, text, generator=generator)


def sample(model, image, num_samples=1, steps=2, generator=None, sampler="ddim"):
    return model.sample(image, SampleConfig(steps=steps, num_samples=num_samples, sampler=sampler), None, generator)


def phantom_batch(dims=2, size=32):
    ph = make_phantom(dims, size, seed=3)
    image = torch.from_numpy((ph.image - ph.image.mean()) / ph.image.std())[None]
    return image, torch.from_numpy(ph.label).long()[None, None]


def overfit(model, steps=60, **loss_options):
    """Segmentation losses of `steps` AdamW steps on one phantom repeated 4 times."""
    image, label = phantom_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = training_losses(model, image.repeat(4, 1, 1, 1), label.repeat(4, 1, 1, 1), generator=g, **loss_options)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss.segmentation.item())
    return losses


@pytest.mark.parametrize("prediction_type,x0_estimate", [("x0", "exact"), ("v", "exact"), ("eps", "paper")])
def test_loss_decreases_when_overfitting_one_phantom(prediction_type, x0_estimate):
    """(eps with the exact x0 divides eps errors by sqrt(alpha-bar_t) ~ 0.006 at t = 999 and needs far
    longer; the core benchmark measures it.)"""
    losses = overfit(tiny_model(prediction_type=prediction_type, x0_estimate=x0_estimate))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_sample_shapes_and_probabilities_3d():
    model = tiny_model(
        3,
        strides=[2, 2, 2],
        image_encoder_channels=[4, 8, 8, 16],
        decoder_channels=[4, 8, 8, 16],
        label_encoder_channels=[4, 4, 8, 8],
        attention_stages=1,
    ).eval()
    image = torch.randn(2, 1, 16, 16, 16)
    probs = sample(model, image, num_samples=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (3, 2, 3, 16, 16, 16)
    torch.testing.assert_close(probs.sum(2), torch.ones(3, 2, 16, 16, 16))


def test_samples_differ_but_are_reproducible_by_seed():
    model = untrained_but_not_zero(tiny_model())
    image, _ = phantom_batch()
    a = sample(model, image, 2, steps=2, generator=torch.Generator().manual_seed(1))
    b = sample(model, image, 2, steps=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("skips", [False, True])
def test_samples_decoded_in_any_grouping_give_the_same_probabilities(skips):
    """`sample.decode_batch`: the decoder takes the samples one, two or all at a time (each pass with
    its own images' conditioning); the probabilities are the same, and "auto" decodes one at a time on
    a CPU."""
    extra = dict(decoder_skips=True, strides=[2, 2, 2], attention_stages=1) if skips else {}
    if skips:
        extra |= dict(image_encoder_channels=[4, 8, 8, 16], decoder_channels=[4, 8, 8, 16])
        extra |= dict(label_encoder_channels=[4, 4, 8, 8])
    model = untrained_but_not_zero(tiny_model(**extra))
    image = torch.randn(2, 1, 32, 32)
    passes = []
    model.label_decoder.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))
    probs = {}
    for per_pass in ("auto", 1, 2, 3):
        options = SampleConfig(steps=2, num_samples=3, decode_batch=per_pass)
        passes.clear()
        probs[per_pass] = model.sample(image, options, None, torch.Generator().manual_seed(4))
        assert passes == {"auto": [2, 2, 2], 1: [2, 2, 2], 2: [4, 2], 3: [6]}[per_pass]  # rows: samples x 2 images
    assert not torch.allclose(probs[3][0], probs[3][1])  # the samples differ, so a mix-up would show
    for per_pass in ("auto", 1, 2):
        torch.testing.assert_close(probs[per_pass], probs[3], atol=1e-6, rtol=1e-5)


def test_auto_decode_batch_is_one_sample_for_2d_on_a_cpu_and_all_in_3d():
    from latentseg.models.segmenter import decode_batch

    auto, two = SampleConfig(), SampleConfig(decode_batch=2)
    assert decode_batch(auto, torch.zeros(8, 4, 16, 16), 4) == 1
    assert decode_batch(auto, torch.zeros(8, 4, 8, 8, 8), 4) == 4
    assert decode_batch(two, torch.zeros(8, 4, 16, 16), 4) == 2 and decode_batch(two, torch.zeros(1, 4, 8, 8), 1) == 1


def test_image_encoder_runs_once_per_image_for_all_samples():
    model = tiny_model().eval()
    calls = []
    model.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    sample(model, torch.randn(2, 1, 32, 32), num_samples=5, steps=3)
    assert calls == [2]


def test_paper_x0_estimate_is_z_t_minus_eps():
    model = tiny_model(prediction_type="eps", x0_estimate="paper")
    z_t, out = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(model.estimate_x0(out, z_t, torch.tensor([500])), z_t - out)
    exact = tiny_model(prediction_type="eps")
    ab = exact.schedule.alphas_cumprod[500]
    expect = (z_t - (1 - ab) ** 0.5 * out) / ab**0.5
    torch.testing.assert_close(exact.estimate_x0(out, z_t, torch.tensor([500])), expect.float())


def test_restandardize_option_changes_sampling():
    image, _ = phantom_batch()
    plain = untrained_but_not_zero(tiny_model())
    restd = tiny_model(restandardize=True).eval()
    restd.load_state_dict(plain.state_dict())
    a = sample(plain, image, 1, steps=5, generator=torch.Generator().manual_seed(0))
    b = sample(restd, image, 1, steps=5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


def test_invalid_model_settings_are_rejected():
    with pytest.raises(ValueError, match="needs prediction_type='eps'"):
        tiny_model(prediction_type="x0", x0_estimate="paper")
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_model(prediction_type="score")
    with pytest.raises(ValueError, match="steps"):
        sample(tiny_model(), torch.randn(1, 1, 32, 32), steps=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_decoder_with_image_skips(dims):
    model = tiny_model(
        dims,
        decoder_skips=True,
        strides=[2, 2, 2],
        image_encoder_channels=[4, 8, 8, 16],
        decoder_channels=[4, 8, 8, 16],
        label_encoder_channels=[4, 4, 8, 8],
        attention_stages=1,
    )
    image = torch.randn(2, 1, *(16,) * dims)
    label = torch.randint(0, 3, (2, 1, *(16,) * dims))
    losses = training_losses(model, image, label)
    losses.total.backward()
    assert model.label_decoder.fuse_full.weight.grad.abs().sum() > 0
    assert model.image_encoder.stages[0][0].conv.weight.grad.abs().sum() > 0
    probs = sample(model.eval(), image, num_samples=3, steps=2)
    assert probs.shape == (3, 2, 3, *(16,) * dims)
    with pytest.raises(ValueError, match="image features"):
        model.label_decoder(torch.randn(1, 4, *(2,) * dims))


def test_latent_reconstruction_makes_the_label_latent_hold_the_mask():
    """With skips the decoder can segment from the image side alone; the reconstruction term decodes
    the clean label latent with the image side zeroed, so the label encoder learns from the mask."""
    image, label = phantom_batch()
    image, label = image.repeat(4, 1, 1, 1), label.repeat(4, 1, 1, 1)

    def encoder_grad_without_noise_term(option: bool) -> float:
        model = tiny_model(decoder_skips=True, decoder_image_latent=True, latent_reconstruction=option)
        losses = training_losses(model, image, label, lam=0.0, generator=torch.Generator().manual_seed(0))
        losses.total.backward()
        grads = [p.grad for p in model.label_encoder.parameters() if p.grad is not None]
        return sum(float(g.abs().sum()) for g in grads)

    assert encoder_grad_without_noise_term(True) > 100 * encoder_grad_without_noise_term(False) >= 0
    model = tiny_model(decoder_skips=True, decoder_image_latent=True, latent_reconstruction=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = training_losses(model, image, label, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    with torch.no_grad():
        cond = model.conditioning(image[:1])
        alone = model.decode_latent_alone(model.encode_label(label[:1]), cond).argmax(1)
    assert (alone == label[:1, 0]).float().mean() > 0.9  # the latent alone gives the mask back


def test_detached_latent_trains_the_label_encoder_from_reconstruction_alone():
    """diffusion_trains_label_encoder=false: the diffusion and decoded-estimate terms give the label
    encoder no gradient (they cannot pull the latent towards what the denoiser predicts); the
    reconstruction term still does, and the denoiser still learns from the diffusion loss."""
    image, label = phantom_batch()

    def grads(**options) -> tuple[float, float]:
        model = tiny_model(decoder_skips=True, decoder_image_latent=True, **options)
        untrained_but_not_zero(model).train()
        training_losses(model, image, label, generator=torch.Generator().manual_seed(0)).total.backward()
        encoder = sum(float(p.grad.abs().sum()) for p in model.label_encoder.parameters() if p.grad is not None)
        denoiser = sum(float(p.grad.abs().sum()) for p in model.denoiser.parameters() if p.grad is not None)
        return encoder, denoiser

    joint = grads(latent_reconstruction=False)
    detached = grads(latent_reconstruction=True, diffusion_trains_label_encoder=False)
    assert joint[0] > 0 and joint[1] > 0
    assert detached[0] > 0 and detached[1] > 0
    model = tiny_model(decoder_skips=True, decoder_image_latent=True, latent_reconstruction=True,
                       diffusion_trains_label_encoder=False)  # fmt: skip
    model.reconstructs_latent = False  # the diffusion terms alone
    training_losses(model, image, label, generator=torch.Generator().manual_seed(0)).total.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.label_encoder.parameters())
    with pytest.raises(ValueError, match="latent_reconstruction"):
        tiny_model(decoder_skips=True, latent_reconstruction=False, diffusion_trains_label_encoder=False)


def test_two_head_staged_training_decreases_the_loss():
    losses = overfit(tiny_model(denoiser_heads=2), timesteps="staged")
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_eps_head_seg_loss_trains_the_eps_head_through_the_decoder():
    """Without the noise term (lambda = 0) only the segmentation loss moves the heads: 004 decodes the
    x0 head alone; `eps_head_seg_loss` also decodes the eps head's estimate, below stage_high only."""
    image, label = phantom_batch()
    image, label = image.repeat(8, 1, 1, 1), label.repeat(8, 1, 1, 1)

    def eps_head_grad(option: bool) -> float:
        model = untrained_but_not_zero(tiny_model(denoiser_heads=2, eps_head_seg_loss=option))
        training_losses(model, image, label, lam=0.0, generator=torch.Generator().manual_seed(0)).total.backward()
        grads = [p.grad for p in model.denoiser.heads[0].parameters()]
        return sum(float(g.abs().sum()) for g in grads if g is not None)

    assert eps_head_grad(False) == 0
    assert eps_head_grad(True) > 0  # some of the 8 drawn t are <= stage_high (600)


def test_one_head_per_sample_loss_equals_monai_dice_ce():
    from monai.losses import DiceCELoss

    model = tiny_model()
    image, label = phantom_batch()
    logits = torch.randn(2, 3, *label.shape[2:])
    labels = torch.cat([label, torch.zeros_like(label)])
    ours = model.segmentation_loss(logits, labels, gamma=2.0).mean()
    oracle = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=2.0)(logits, labels)
    assert torch.allclose(ours, oracle, atol=1e-6)


def test_staged_sampling_shapes_and_errors():
    model = untrained_but_not_zero(tiny_model(denoiser_heads=2))
    image, _ = phantom_batch()
    probs = sample(model, image.repeat(2, 1, 1, 1), 6, sampler="staged", generator=torch.Generator().manual_seed(0))
    assert probs.shape == (6, 2, 3, 32, 32)
    assert torch.allclose(probs.sum(2), torch.ones(()))
    with pytest.raises(ValueError, match="must be even"):
        sample(model, image, 3, sampler="staged")
    with pytest.raises(ValueError, match="denoiser_heads=2"):
        sample(untrained_but_not_zero(tiny_model()), image, 2, sampler="staged")
    with pytest.raises(ValueError, match="prediction_type picks the head"):
        tiny_model(denoiser_heads=2, prediction_type="v")


def test_pretrained_condition_network_trains_then_freezes():
    model = tiny_model(condition="pretrained", denoiser_heads=2)
    image, label = phantom_batch()
    image, label = image.repeat(2, 1, 1, 1), label.repeat(2, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.condition_losses(image, label).total.item()
    for _ in range(30):
        loss = model.condition_losses(image, label)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    assert loss.total.item() < 0.5 * first
    model.freeze("condition")
    frozen = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    opt.zero_grad(set_to_none=True)
    training_losses(model, image, label, timesteps="staged").total.backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(p.grad is not None for p in model.denoiser.dca.parameters())
    opt.step()
    assert all(torch.equal(v, model.image_encoder.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_text_changes_the_condition_and_is_required(fusion):
    from latentseg.text import TextEmbedding

    model = tiny_model(text_fusion=fusion, text_dim=12).eval()
    image, _ = phantom_batch()
    g = torch.Generator().manual_seed(0)
    a = TextEmbedding(torch.randn(1, 5, 12, generator=g), torch.zeros(1, 5, dtype=torch.bool), torch.randn(1, 12))
    b = TextEmbedding(torch.randn(1, 5, 12, generator=g), torch.zeros(1, 5, dtype=torch.bool), torch.randn(1, 12))
    za = model.conditioning(image, a)["z_image"]
    assert not torch.allclose(za, model.conditioning(image, b)["z_image"])
    with pytest.raises(ValueError, match="trained with text"):
        model.conditioning(image)
    with pytest.raises(ValueError, match="trained without text"):
        tiny_model().conditioning(image, a)


def test_mask_autoencoder_pretrains_then_the_diffusion_trains_on_the_latent_alone():
    """002 section 2.1: the mask autoencoder learns alone (Eq. 3), is frozen, and the diffusion loss
    is then the latent MSE without decoding."""
    model = tiny_model(label_autoencoder="pretrained")
    assert model.pretrain_parts == ("autoencoder",)
    image, label = phantom_batch()
    image, label = image.repeat(2, 1, 1, 1), label.repeat(2, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.autoencoder_losses(label).segmentation.item()
    for _ in range(40):
        loss = model.pretrain_losses(image, label, ("autoencoder",))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    assert loss.segmentation.item() < 0.3 * first
    assert loss.total.item() > loss.segmentation.item()  # + lambda ||w||^2
    assert all(p.grad is None for p in model.denoiser.parameters())  # only the autoencoder trained
    model.freeze("autoencoder")
    frozen = {k: v.clone() for k, v in model.label_decoder.state_dict().items()}
    opt.zero_grad(set_to_none=True)
    losses = training_losses(model, image, label)
    assert losses.segmentation.item() == 0.0 and torch.equal(losses.total, losses.diffusion)
    losses.total.backward()
    assert all(p.grad is None for m in (model.label_encoder, model.label_decoder) for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())
    opt.step()
    assert all(torch.equal(v, model.label_decoder.state_dict()[k]) for k, v in frozen.items())
    both = tiny_model(label_autoencoder="pretrained", condition="pretrained")
    assert both.pretrain_parts == ("condition", "autoencoder")
    summed = both.pretrain_losses(image, label, both.pretrain_parts)
    torch.manual_seed(0)
    parts = [both.condition_losses(image, label).total, both.autoencoder_losses(label).total]
    assert summed.total.item() == pytest.approx(sum(p.item() for p in parts))
    with pytest.raises(ValueError, match="cannot use decoder_skips"):
        tiny_model(label_autoencoder="pretrained", decoder_skips=True)


@pytest.mark.parametrize("dims,strides", [(2, [2, 2, 2, 2]), (3, [[1, 2, 2], 2, 2, [2, 1, 1]])])
def test_downsample_encoders_give_the_learned_encoders_latent_grid(dims, strides):
    """000 Table II zeta_2 / zeta_3: plain downsampling in place of the image / label encoder."""
    shape = (2, 1) + ((32, 48) if dims == 2 else (12, 32, 24))
    image = torch.randn(shape)
    label = torch.randint(0, 3, shape)
    learned = tiny_model(dims, strides=strides)
    plain = tiny_model(dims, strides=strides, image_encoder="downsample", label_encoder="downsample")
    assert plain.conditioning(image)["z_image"].shape == learned.conditioning(image)["z_image"].shape
    z = plain.encode_label(label)
    assert z.shape == learned.encode_label(label).shape
    assert z.mean().abs() < 1e-4 and (z.std(unbiased=False) - 1).abs() < 1e-3  # standardized (003 Eq. 10)
    assert sum(p.numel() for p in plain.image_encoder.parameters()) == 8 * 1 + 8  # one 1x1 convolution
    overfit_losses = overfit(tiny_model(image_encoder="downsample", label_encoder="downsample"), steps=40)
    assert sum(overfit_losses[-5:]) / 5 < 0.7 * sum(overfit_losses[:5]) / 5
    with pytest.raises(ValueError, match="image_encoder must be one of learned, downsample"):
        tiny_model(image_encoder="pooling")
    with pytest.raises(ValueError, match="cannot be used with decoder_skips or condition=pretrained"):
        tiny_model(image_encoder="downsample", decoder_skips=True)


def test_importance_timesteps_weight_the_loss_and_learn_from_it():
    from latentseg.diffusion import ImportanceTimesteps
    from latentseg.models.objective import LatentDiffusionObjective, timestep_rule

    model = tiny_model()
    image, label = phantom_batch()
    importance = ImportanceTimesteps(1000, bins=2, history=2)
    objective = LatentDiffusionObjective(model, importance, Config(model=model.config))
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        objective.diffusion_losses(image.repeat(4, 1, 1, 1), label.repeat(4, 1, 1, 1), generator=g)
    assert importance.counts.sum().item() == 16 and importance.warm
    assert importance.losses.min() > 0
    config = Config(model=model.config)
    config.train.timesteps = "importance"
    assert isinstance(timestep_rule(config), ImportanceTimesteps)  # what train.timesteps=importance trains with


def test_text_in_the_denoiser_levels_uses_the_tokens():
    from latentseg.text import TextEmbedding

    model = untrained_but_not_zero(tiny_model(text_fusion="attention", text_dim=12, text_in_denoiser=True))
    assert len(model.denoiser.text_attention) == 2  # one per denoiser level
    image, label = phantom_batch()
    g = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(1, 3, 12, generator=g), torch.tensor([[False, False, True]]), torch.zeros(1, 12))
    cond = model.conditioning(image, text)
    assert torch.equal(cond["text_tokens"], text.tokens) and torch.equal(cond["text_padding"], text.padding)
    z_t, t = torch.randn(1, 4, 2, 2, generator=g), torch.tensor([500])
    before = model.denoiser(z_t, t, cond)
    changed = dict(cond, text_tokens=cond["text_tokens"] + torch.randn(1, 3, 12, generator=g))
    # the fused z_image is the same in both, so any difference comes from the levels' attention
    assert not torch.allclose(model.denoiser.forward_heads(z_t, t, changed)[0], before)
    padded = dict(cond, text_tokens=torch.cat([cond["text_tokens"][:, :2], torch.randn(1, 1, 12)], 1))
    assert torch.allclose(model.denoiser(z_t, t, padded), before, atol=1e-6)  # padding is masked
    losses = training_losses(model, image, label, text=text)
    losses.total.backward()
    assert all(p.grad is not None for p in model.denoiser.text_attention.parameters())
    with pytest.raises(ValueError, match="needs text_fusion=attention"):
        tiny_model(text_fusion="concat", text_dim=12, text_in_denoiser=True)


def test_decoder_fuse_kernel_sets_the_skip_fusion_and_unplanned_means_3x3():
    """`model.decoder_fuse_kernel`: 1 fuses each image skip pointwise (fewer weights, same output
    shape); "auto" unplanned builds the 3x3 fusion of models saved before the field existed, so
    their weights still load."""
    image, label = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    built = {k: tiny_model(decoder_skips=True, decoder_fuse_kernel=k) for k in ("auto", 3, 1)}
    kernels = {k: {f.kernel_size for f in m.label_decoder.fuse} for k, m in built.items()}
    assert kernels == {"auto": {(3, 3)}, 3: {(3, 3)}, 1: {(1, 1)}}
    built[3].load_state_dict(built["auto"].state_dict())  # an older model's weights fit "auto"
    with pytest.raises(RuntimeError, match="size mismatch"):
        built[1].load_state_dict(built["auto"].state_dict())
    params = {k: sum(p.numel() for p in m.label_decoder.parameters()) for k, m in built.items()}
    assert params[1] < params[3]
    losses = training_losses(built[1], image, label)
    assert torch.isfinite(losses.total)
    losses.total.backward()
    assert all(f.weight.grad is not None and f.weight.grad.abs().sum() > 0 for f in built[1].label_decoder.fuse)
