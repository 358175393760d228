"""Fused nearest ×2 + 3×3 convolution equals the plain diffusers modules."""

import copy

import pytest
import torch
import torch.nn.functional as F

from comfyui_diffsr.sr_common.fused_upsample import (FusedUpsample2D, fast_vae_decoder, fuse_upsamplers,
                                                       upsample2x_conv3x3)


def plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (3, 4, 1, 1), (2, 16, 12, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_nearest_then_conv(shape, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 6, 3, padding=1)
    x = torch.randn(shape)
    if channels_last:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = upsample2x_conv3x3(x, conv.weight, conv.bias), plain(x, conv)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last and shape[-1] > 1 else
                             torch.contiguous_format)


def test_bfloat16_close():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 8, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref = upsample2x_conv3x3(x, conv.weight, conv.bias).float(), plain(x.float(), conv.float())
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_decoder_and_unet_same_function(tiny_unet_vae):
    """Swapping the upsamplers keeps the state dict and the outputs (VAE decoder, UNet with odd skip sizes)."""
    unet, vae = tiny_unet_vae
    fast_dec, fast_unet = fast_vae_decoder(copy.deepcopy(vae.decoder)), fuse_upsamplers(copy.deepcopy(unet))
    assert any(isinstance(m, FusedUpsample2D) for m in fast_dec.modules())
    assert any(isinstance(m, FusedUpsample2D) for m in fast_unet.modules())
    assert fast_dec.state_dict().keys() == vae.decoder.state_dict().keys()
    assert fast_unet.state_dict().keys() == unet.state_dict().keys()
    torch.manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, 9, 13)
    zu = torch.randn(1, unet.config.in_channels, 12, 20)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast_dec(z), vae.decoder(z), rtol=1e-4, atol=1e-4)
        t = torch.tensor([999])
        torch.testing.assert_close(fast_unet(zu, t, encoder_hidden_states=emb).sample,
                                   unet(zu, t, encoder_hidden_states=emb).sample, rtol=1e-4, atol=1e-4)


def test_other_output_size_falls_back():
    torch.manual_seed(0)
    from diffusers.models.upsampling import Upsample2D

    up = Upsample2D(4, use_conv=True)
    fused = FusedUpsample2D(up)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, output_size=(11, 9)), up(x, output_size=(11, 9)))
