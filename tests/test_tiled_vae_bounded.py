"""``tiled_forward(mode="bounded")``: one tile at a time, close to the untiled VAE, memory set by the tile."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.osediff_core.pipeline import build_osediff
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common.image import pil_to_tensor
from comfyui_diffsr.sr_common.sd21 import load_sd21
from comfyui_diffsr.sr_common import tiled_vae
from comfyui_diffsr.sr_common.tiled_vae import DECODER_PAD, ENCODER_PAD, split_tiles, tiled_forward

from conftest import DATA, copy_tiny_sd21, cpu_float16, half_channels_last, psnr

ENCODE_TILE, DECODE_TILE = 64, 8  # as test_osediff_parity / test_dossr_pipeline: several tiles on these sizes


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """The tiny OSEDiff (LoRA encoder) and DoSSR VAEs, each with a ×4 bicubic fixture image in [−1, 1]."""
    sd = load_sd21(copy_tiny_sd21(os.path.join(str(tmp_path_factory.mktemp("bounded")), "tiny_sd21")))
    osediff = build_osediff(sd, read_osediff(os.path.join(DATA, "osediff", "osediff_tiny.pkl")))
    dossr = load_dossr(os.path.join(DATA, "dossr", "dossr_tiny.ckpt"),
                       config=os.path.join(DATA, "dossr", "tiny_cldm.yaml"), text_heads=2)
    lr = pil_to_tensor(Image.open(os.path.join(DATA, "dossr", "lr_w32h32.png")))
    return {"osediff": (osediff.lq_encoder["encoder"], osediff.vae, x4(os.path.join(DATA, "osediff", "in_64x48.png"))),
            "dossr": (dossr.vae.encoder, dossr.vae, x4(torch.cat([lr, lr.flip(-1)], dim=-1)))}


def x4(image):
    """×4 bicubic of a path or (1, 3, h, w) tensor in [0, 1], as 2x − 1 (the pipelines' VAE input)."""
    if isinstance(image, str):
        image = pil_to_tensor(Image.open(image))
    return (F.interpolate(image, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1)


def image_latent(vae, image):
    """The decoder input for ``image``: post_quant_conv(mean of the untiled posterior)."""
    return vae.post_quant_conv(vae.quant_conv(vae.encoder(image)).chunk(2, dim=1)[0])


# measured (dB; encoder: peak = range of the untiled output, decoder: peak 2 on [−1, 1]), with the latent stage
# (mid block, its attention included) run whole: osediff encoder 37.4, decoder 43.6 (40.3 / 48.2 with the 32-channel
# VAE of earlier fixtures); dossr encoder 72.6, decoder 65.3 (55.5 / 60.2 with its 32-channel VAE, until 2026-12-06).
# With the mid block per tile as well: osediff 31.3 / 35.1 (37.0 / 32.6 with the 32-channel VAE), dossr 47.9 / 37.9
# (34.6 / 25.5 with its 32-channel VAE) (``official``: osediff 22.1 / 29.4, dossr 43.2 / 36.8).
# These tiles are tiny (64 px, 8 latent), so most of each core lies within a receptive field of its tile's border,
# and the figures are one draw of weights' as much as the tiling's: the 32-channel osediff decoder gave 38–52 dB
# (16–38 per tile) over ten seeds of its recipe; the former DoSSR VAE (ch 32) drawn by the same rules with 7 seeds
# 55.5–65.6 / 52.3–63.0 whole and 33.3–41.1 / 24.3–36.0 per tile. The bounds sit under this draw's.
@pytest.mark.parametrize("name, enc_db, dec_db", [("osediff", 36.5, 43), ("dossr", 71.5, 64.5)])
@torch.no_grad()
def test_close_to_untiled(vaes, name, enc_db, dec_db):
    encoder, vae, image = vaes[name]
    untiled = encoder(image)
    tiled = tiled_forward(encoder, image, ENCODE_TILE, is_decoder=False, mode="bounded")
    assert psnr(tiled, untiled, peak=(untiled.max() - untiled.min()).item()) >= enc_db
    z = image_latent(vae, image)
    untiled = vae.decoder(z)
    tiled = tiled_forward(vae.decoder, z, DECODE_TILE, is_decoder=True, mode="bounded")
    assert psnr(tiled, untiled, peak=2) >= dec_db


# measured at the default encoder tile (1024 px, both pipelines) on a 1152×1216 input: osediff 57.4 (53.7 with the
# 32-channel VAE of earlier fixtures), dossr 65.8 (51.6 with its 32-channel VAE); the decoder at its default tile
# (224 latent) on a 248×256 latent: 43.3 / 52.7 with the 32-channel VAEs (not run here: a minute each)
@pytest.mark.parametrize("name", ["osediff", "dossr"])
@torch.no_grad()
def test_default_encoder_tile_close_to_untiled(vaes, name):
    encoder, _, image = vaes[name]
    image = F.interpolate(image, size=(1152, 1216), mode="bicubic", align_corners=False).clamp(-1, 1)
    untiled = encoder(image)
    tiled = tiled_forward(encoder, image, 1024, is_decoder=False, mode="bounded")
    assert psnr(tiled, untiled, peak=(untiled.max() - untiled.min()).item()) >= 45


@torch.no_grad()
def test_one_tile_at_a_time(vaes):
    """The latent stage (conv_in, mid block) runs once on the whole latent, so its attention is exact as in
    ``exact``; above it every conv sees at most one padded tile (at its own resolution), and each tile reaches
    conv_out before the next one starts."""
    decoder = vaes["osediff"][1].decoder
    z = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    extent = DECODE_TILE + 2 * DECODER_PAD
    tiles = len(split_tiles(40, 56, DECODE_TILE, DECODER_PAD, 8)[0])
    assert tiles >= 12
    convs = {name: m for name, m in decoder.named_modules() if isinstance(m, torch.nn.Conv2d)}
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, *args[0].shape[-2:])))
             for name, m in convs.items()]
    attention = decoder.mid_block.attentions[0].to_q
    hooks.append(attention.register_forward_pre_hook(lambda m, args: seen.append(("tokens", args[0].shape[1], 0))))
    try:
        decoder(torch.zeros(1, 4, 8, 8))
        scale = {name: h / 8 for name, h, _ in seen if name != "tokens"}  # each conv's resolution / latent's
        seen.clear()
        tiled_forward(decoder, z, DECODE_TILE, is_decoder=True, mode="bounded")
        bounded = list(seen)
        seen.clear()
        tiled_forward(decoder, z, DECODE_TILE, is_decoder=True, mode="exact")
        exact = list(seen)
    finally:
        for h in hooks:
            h.remove()
    latent_stage = {name for name in convs if name == "conv_in" or name.startswith("mid_block.")}
    assert [(h, w) for name, h, w in bounded if name in latent_stage] == [(40, 56)] * len(latent_stage)
    assert [n for name, n, _ in bounded if name == "tokens"] == [40 * 56]
    assert all(h <= extent * scale[name] and w <= extent * scale[name] for name, h, w in bounded
               if name != "tokens" and name not in latent_stage)
    first_up = "up_blocks.0.resnets.0.conv1"
    ends = [name for name, *_ in bounded if name in (first_up, "conv_out")]
    assert ends == [first_up, "conv_out"] * (1 + 2 * tiles)  # the subsampled input, then two passes
    assert [n for name, n, _ in exact if name == "tokens"] == [40 * 56]
    ends = [name for name, *_ in exact if name in ("conv_in", "conv_out")]
    assert ends == ["conv_in"] * tiles + ["conv_out"] * tiles


# measured with the latent stage per tile as well (before it ran whole): 31.3 / 35.1 / 47.9 / 37.9 dB
@torch.no_grad()
@pytest.mark.parametrize("name,enc_db,dec_db", [("osediff", 30.5, 34.5), ("dossr", 47.5, 37.5)])
def test_latent_past_the_limit_runs_its_latent_stage_per_tile(vaes, monkeypatch, name, enc_db, dec_db):
    monkeypatch.setattr(tiled_vae, "LATENT_STAGE_MIN_AREA", 0)
    monkeypatch.setattr(tiled_vae, "LATENT_STAGE_TILES", 1)  # so these small latents are past the limit
    encoder, vae, image = vaes[name]
    z = image_latent(vae, image)
    assert not tiled_vae.whole_latent_stage(z.shape[-2] * z.shape[-1], DECODE_TILE)
    tokens = []
    hooks = [net.mid_block.attentions[0].to_q.register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
             for net in (vae.decoder, encoder)]
    try:
        tiled_dec = tiled_forward(vae.decoder, z, DECODE_TILE, is_decoder=True, mode="bounded")
        tiled_enc = tiled_forward(encoder, image, ENCODE_TILE, is_decoder=False, mode="bounded")
    finally:
        for h in hooks:
            h.remove()
    tiles = [len(split_tiles(*z.shape[-2:], DECODE_TILE, DECODER_PAD, 8)[0]),
             len(split_tiles(*image.shape[-2:], ENCODE_TILE, ENCODER_PAD, 1 / 8)[0])]
    assert len(tokens) == 2 + 2 * sum(tiles)  # per network: the subsampled pass, then two passes over the tiles
    assert max(tokens) <= max((DECODE_TILE + 2 * DECODER_PAD) ** 2, ((ENCODE_TILE + 2 * ENCODER_PAD) // 8) ** 2)
    assert psnr(tiled_dec, vae.decoder(z), peak=2) >= dec_db
    untiled = encoder(image)
    assert psnr(tiled_enc, untiled, peak=(untiled.max() - untiled.min()).item()) >= enc_db


@torch.no_grad()
def test_tile_larger_than_input_is_untiled(vaes):
    encoder, vae, image = vaes["dossr"]
    assert torch.equal(tiled_forward(encoder, image, 1024, is_decoder=False, mode="bounded"), encoder(image))
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiled_forward(vae.decoder, z, 64, is_decoder=True, mode="bounded"), vae.decoder(z))


@torch.no_grad()
@pytest.mark.parametrize("mode", ["bounded", "exact", "official"])
def test_untiled_up_to_the_tile_and_its_margins(vaes, mode):
    """The official hook's rule: untiled while max(H, W) ≤ tile + 2·pad (the encoder's pad 32 px, the decoder's 11
    latent px), tiled one pixel past it."""
    encoder, vae, image = vaes["dossr"]
    side = ENCODE_TILE + 2 * ENCODER_PAD
    assert torch.equal(tiled_forward(encoder, image[..., :side, :side], ENCODE_TILE, is_decoder=False, mode=mode),
                       encoder(image[..., :side, :side]))
    past = image[..., :side, :side + 8]  # the fixture image is 128 × 256 px
    assert not torch.equal(tiled_forward(encoder, past, ENCODE_TILE, is_decoder=False, mode=mode), encoder(past))
    z = torch.randn(1, 4, DECODE_TILE + 2 * DECODER_PAD + 1, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiled_forward(vae.decoder, z[:, :, :-1], DECODE_TILE, is_decoder=True, mode=mode),
                       vae.decoder(z[:, :, :-1]))
    assert not torch.equal(tiled_forward(vae.decoder, z, DECODE_TILE, is_decoder=True, mode=mode), vae.decoder(z))


@torch.no_grad()
def test_odd_sizes(vaes):
    encoder, vae, _ = vaes["osediff"]
    z = torch.randn(1, 4, 37, 23, generator=torch.Generator().manual_seed(2))
    out = tiled_forward(vae.decoder, z, 8, is_decoder=True, mode="bounded")
    assert out.shape == (1, 3, 296, 184) and torch.isfinite(out).all()
    image = torch.rand(1, 3, 101, 77, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = tiled_forward(encoder, image, 16, is_decoder=False, mode="bounded")
    assert out.shape == encoder(image).shape and torch.isfinite(out).all()


@torch.no_grad()
def test_callback_reaches_total(vaes):
    decoder = vaes["dossr"][1].decoder
    z = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(4))
    seen = []
    tiled_forward(decoder, z, DECODE_TILE, is_decoder=True, mode="bounded", callback=lambda d, t: seen.append((d, t)))
    tiles = len(split_tiles(32, 40, DECODE_TILE, DECODER_PAD, 8)[0])
    assert seen == [(d, 1 + 2 * tiles) for d in range(1, 2 + 2 * tiles)]


def test_unknown_mode():
    with pytest.raises(ValueError, match="bounded"):
        tiled_forward(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), 8, is_decoder=False, mode="bogus")


@cpu_float16
@pytest.mark.parametrize("mode", ["bounded", "exact", "official"])
def test_fp16_overflow_runs_again_in_float32(tiny_unet_vae, mode):
    """An fp16 VAE whose activations pass fp16's ±65504 gives the float32 result instead of inf/NaN, with a warning,
    and is left as it was (fp16, the same tensors)."""
    vae = copy.deepcopy(tiny_unet_vae[1])
    with torch.no_grad():
        for conv in (vae.decoder.conv_in, vae.encoder.conv_in):
            conv.weight.mul_(1e5)
            conv.bias.mul_(1e5)
    g = torch.Generator().manual_seed(0)
    cases = [(vae.decoder, torch.randn(1, 4, 24, 24, generator=g), DECODE_TILE, True),
             (vae.encoder, torch.rand(1, 3, 160, 144, generator=g) * 2 - 1, ENCODE_TILE, False)]
    with torch.no_grad():
        for net, x, tile, is_decoder in cases:
            half = half_channels_last(copy.deepcopy(net))
            weights = [p.data_ptr() for p in half.parameters()]
            reference = tiled_forward(copy.deepcopy(half).float(), x.half().float(), tile, is_decoder, mode=mode)
            assert not torch.isfinite(tiled_vae._tiled_forward(half, x.half(), tile, is_decoder, None, mode)).all()
            with pytest.warns(RuntimeWarning, match="overflowed"):
                out = tiled_forward(half, x.half(), tile, is_decoder, mode=mode)
            assert out.dtype == torch.float32 and torch.equal(out, reference)
            assert [p.data_ptr() for p in half.parameters()] == weights
            assert all(p.dtype == torch.float16 for p in half.parameters())


@cpu_float16
def test_finite_fp16_output_is_not_run_again(tiny_unet_vae):
    """No overflow: the fp16 result as it is, once."""
    half = half_channels_last(copy.deepcopy(tiny_unet_vae[1].decoder))
    z = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(1)).half()  # 2 tiles
    calls, once = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tiled_forward(half, z, DECODE_TILE, True, callback=lambda *progress: calls.append(progress))
        tiled_vae._tiled_forward(half, z, DECODE_TILE, True, lambda *progress: once.append(progress), "bounded")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert len(once) > 1 and calls == once


@pytest.mark.parametrize("mode", ["bounded", "exact", "official"])
def test_encoder_tile_not_a_multiple_of_8(vaes, mode):
    """An encoder tile that is not a multiple of 8 (150 px on a 512 × 16 image) works as the multiple of 8 below
    it; before, the tiles and their latent boxes disagreed by a pixel and the paste failed."""
    encoder = vaes["osediff"][0]
    x = torch.rand(1, 3, 16, 512, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        out = tiled_forward(encoder, x, 150, is_decoder=False, mode=mode)
        assert out.shape[-2:] == (2, 64)
        assert torch.equal(out, tiled_forward(encoder, x, 144, is_decoder=False, mode=mode))


@torch.no_grad()
def test_exact_mode_equals_the_untiled_network(tiny_unet_vae):
    """``exact``: margins exchanged before every GroupNorm and residual, statistics and attention over the whole
    image, so several tiles give the untiled output up to float rounding (measured 4.5e-6 off for the decoder, 2.1e-6
    for the encoder)."""
    vae = tiny_unet_vae[1]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 16, 36, generator=g)
    assert len(split_tiles(16, 36, DECODE_TILE, DECODER_PAD, 8)[0]) > 1
    out = tiled_forward(vae.decoder, z, DECODE_TILE, is_decoder=True, mode="exact")
    assert (out - vae.decoder(z)).abs().max().item() < 1e-4
    x = torch.rand(1, 3, 96, 224, generator=g) * 2 - 1
    assert len(split_tiles(96, 224, ENCODE_TILE, ENCODER_PAD, 1 / 8)[0]) > 1
    out = tiled_forward(vae.encoder, x, ENCODE_TILE, is_decoder=False, mode="exact")
    assert (out - vae.encoder(x)).abs().max().item() < 1e-4


@torch.no_grad()
def test_group_norm_with_given_statistics_equals_torchs_also_on_a_flat_group():
    """A GroupNorm of the tiled ops, normalised with the tensor's own statistics (as ``bounded``'s latent stage does),
    is ``torch.nn.GroupNorm``: biased variance over each group of 2 channels, ε inside the root, so a flat group gives
    its bias (not NaN)."""
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    norm.weight.normal_(generator=torch.Generator().manual_seed(6))
    norm.bias.normal_(generator=torch.Generator().manual_seed(7))
    x = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(8))
    x[:, 2:4] = 0.7  # group 1 flat
    out = tiled_vae._run_ops([("norm", norm)], x.clone(), tiled_vae._own_stats)
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_largest_piece_is_the_largest_input_the_encoder_runs(tiny_unet_vae):
    """The memory estimate's piece is what ``tiled_forward`` runs: with an encoder tile that is not a multiple of 8
    (150 px, run as 144), the largest input its first convolution sees."""
    encoder = tiny_unet_vae[1].encoder
    x = torch.rand(1, 3, 16, 360, generator=torch.Generator().manual_seed(9)) * 2 - 1
    seen = []
    hook = encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        tiled_forward(encoder, x, 150, is_decoder=False, mode="bounded")
    finally:
        hook.remove()
    assert len(seen) > 2
    assert tiled_vae.largest_piece(16, 360, 150, is_decoder=False) == max(seen, key=lambda hw: hw[0] * hw[1])


class _Scale(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return x * self.scale


def test_fp16_output_of_inf_without_nan_runs_again_in_float32():
    """An fp16 network whose output overflows to ±inf only (no NaN) is run again in float32 too."""
    net = _Scale(1e4).half()
    x = torch.tensor([[[[10.0, -10.0], [0.5, 1.0]]]]).half()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="overflowed"):
        out = tiled_forward(net, x, None, is_decoder=True)
    assert out.dtype == torch.float32 and torch.equal(out, x.float() * 1e4)
    assert net.scale.dtype == torch.float16


def test_whole_latent_stage_includes_its_limits():
    """Whole up to and including 16 tiles' latent area, and up to and including a 256² latent."""
    assert tiled_vae.whole_latent_stage(256 * 256, 8) and not tiled_vae.whole_latent_stage(256 * 256 + 1, 8)
    assert tiled_vae.whole_latent_stage(16 * 80**2, 80) and not tiled_vae.whole_latent_stage(16 * 80**2 + 1, 80)


@torch.no_grad()
def test_the_encoder_limit_is_on_its_latent_area(tiny_unet_vae, monkeypatch):
    """The limit of a whole latent stage is on the latent's area (1/64 of the image's): with a limit of 64 latent px,
    a 16 × 256 image (a 2 × 32 latent) still runs its mid-block attention once, over all 64 latent pixels."""
    monkeypatch.setattr(tiled_vae, "LATENT_STAGE_MIN_AREA", 0)
    monkeypatch.setattr(tiled_vae, "LATENT_STAGE_TILES", 1)  # the limit: one 64 px tile's latent, 8² = 64
    encoder = tiny_unet_vae[1].encoder
    x = torch.rand(1, 3, 16, 256, generator=torch.Generator().manual_seed(13)) * 2 - 1
    assert len(split_tiles(16, 256, ENCODE_TILE, ENCODER_PAD, 1 / 8)[0]) > 1
    tokens = []
    to_q = encoder.mid_block.attentions[0].to_q
    hook = to_q.register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
    try:
        tiled_forward(encoder, x, ENCODE_TILE, is_decoder=False, mode="bounded")
    finally:
        hook.remove()
    assert tokens == [2 * 32]
