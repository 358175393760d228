"""Shared pieces: tiling grid and weights, colour fix, resize, safe loading."""

import json
import math
import os
import pickle
import re
import sys
import unicodedata

import diffusers
import numpy as np
import pytest
import torch
from packaging import version
from PIL import Image

from comfyui_diffsr.sr_common import color_fix, image, tiling
from comfyui_diffsr.sr_common.errors import DiffSRError, ImageInputError, WeightFileError
from comfyui_diffsr.sr_common.names import quoted_name
from comfyui_diffsr.sr_common.weights import (as_float32_cpu, fresh_float32_cpu, read_state_dict, stored_as_float32,
                                             write_safetensors)


def test_tile_offsets_official_rule():
    # smallest n with (n-1)(T-O)+T >= size; last tile flush with the border
    assert tiling.tile_offsets(128, 96, 32) == [0, 32]
    assert tiling.tile_offsets(256, 96, 32) == [0, 64, 128, 160]
    assert tiling.tile_offsets(96, 96, 32) == [0]
    assert tiling.latent_tiles(20, 50, 96, 32) == [(0, 0, 20), (0, 10, 20), (0, 20, 20), (0, 30, 20)]
    with pytest.raises(ValueError, match="tile_overlap"):
        tiling.tile_offsets(100, 8, 8)


def test_gaussian_tile_weights_formula():
    w = tiling.gaussian_tile_weights(96, 96)
    g = lambda i, m: math.exp(-((i - m) ** 2) / 96**2 / 0.02) / math.sqrt(2 * math.pi * 0.01)
    assert w.dtype == torch.float64
    assert w[10, 20].item() == pytest.approx(g(10, 48) * g(20, 47.5), rel=1e-12)
    assert w[0, 0].item() / w[48, 47].item() == pytest.approx(g(0, 48) * g(0, 47.5) / (g(48, 48) * g(47, 47.5)))


def test_blend_tiles_reproduces_a_pointwise_function():
    latent = torch.randn(1, 4, 40, 52)
    out = tiling.blend_tiles(lambda t: t * 2 + 1, latent, 16, 8)
    torch.testing.assert_close(out, latent * 2 + 1, atol=1e-5, rtol=1e-5)


def test_blend_tiles_weights_overlapping_tiles_with_the_gaussian():
    """A non-pointwise fn (each tile → its top-left value everywhere) makes overlapping tiles disagree, so the
    blend shows its weights: out = Σ_k w_k·c_k / Σ_k w_k with w the Gaussian of the official code (m = T/2 down,
    (T − 1)/2 across, var 0.01), written out here in float64. Uniform weights (any normalised weights reproduce
    a pointwise fn) are off by up to 2.0 here; measured ≤ 3.9e-7."""
    latent = torch.randn(1, 2, 24, 40, generator=torch.Generator().manual_seed(4))
    out = tiling.blend_tiles(lambda t: t[:, :, :1, :1].expand_as(t), latent, 16, 8)
    g = lambda n, mid: torch.exp(-((torch.arange(n, dtype=torch.float64) - mid) ** 2) / n**2 / 0.02)
    w = torch.outer(g(16, 8.0), g(16, 7.5))
    num, den = torch.zeros(1, 2, 24, 40, dtype=torch.float64), torch.zeros(24, 40, dtype=torch.float64)
    for y in (0, 8):  # tile_offsets(24, 16, 8) and (40, 16, 8): a 2 × 4 grid of 16 × 16 tiles
        for x in (0, 8, 16, 24):
            num[:, :, y:y + 16, x:x + 16] += w * latent[:, :, y:y + 1, x:x + 1].double()
            den[y:y + 16, x:x + 16] += w
    assert tiling.latent_tiles(24, 40, 16, 8) == [(y, x, 16) for y in (0, 8) for x in (0, 8, 16, 24)]
    assert (out.double() - num / den).abs().max().item() < 2e-6


def test_adain_matches_formula():
    t, s = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 0.5
    out = color_fix.apply_color_fix(t, s, "adain")
    ref = (t - t.mean((2, 3), keepdim=True)) / (t.var((2, 3), keepdim=True) + 1e-5).sqrt() \
        * (s.var((2, 3), keepdim=True) + 1e-5).sqrt() + s.mean((2, 3), keepdim=True)
    torch.testing.assert_close(out, ref.clamp(0, 1))


def test_wavelet_keeps_target_detail_and_source_colour():
    target = torch.rand(1, 3, 64, 64)
    flat_source = torch.full((1, 3, 64, 64), 0.25)
    out = color_fix.apply_color_fix(target, flat_source, "wavelet")
    high, low = color_fix.wavelet_decomposition(target)
    torch.testing.assert_close(high + low, target, atol=1e-5, rtol=0)  # perfect reconstruction
    torch.testing.assert_close(out, (high + 0.25).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="color_fix"):
        color_fix.apply_color_fix(target, target, "bogus")


def a_trous_blur(x, r):
    """StableSR's wavelet_blur written out in float64: the 3×3 kernel [1,2,1]ᵀ[1,2,1]/16 with taps ``r`` apart,
    borders replicated (indices clamped)."""
    x = x.double()
    height, width = x.shape[-2:]
    k = (0.25, 0.5, 0.25)
    rows = [torch.arange(height).add(d * r).clamp(0, height - 1) for d in (-1, 0, 1)]
    cols = [torch.arange(width).add(d * r).clamp(0, width - 1) for d in (-1, 0, 1)]
    return sum(k[a] * k[b] * x[:, :, rows[a]][:, :, :, cols[b]] for a in range(3) for b in range(3))


def a_trous_low(x):
    """The low band of the official wavelet_decomposition: 5 blurs with dilation 1, 2, 4, 8, 16."""
    for i in range(5):
        x = a_trous_blur(x, 2**i)
    return x


def test_wavelet_decomposition_is_the_five_level_replicate_padded_a_trous_blur():
    """high + low = x holds for any blur, so the blur itself is checked against the kernel written out: 5 levels,
    dilation 2^i, replicate padding (the official wavelet_blur / wavelet_decomposition), then the whole fix
    high(target) + low(source). Measured ≤ 1.7e-7 off (float32); reflect or zero padding, 4 levels, dilation i + 1
    or a box kernel are 0.03–0.4 off."""
    gen = torch.Generator().manual_seed(5)
    target, source = torch.rand(1, 3, 40, 48, generator=gen), torch.rand(1, 3, 40, 48, generator=gen)
    for r in (1, 2, 4, 8, 16):
        assert (color_fix.wavelet_blur(target, r).double() - a_trous_blur(target, r)).abs().max().item() < 1e-6
    high, low = color_fix.wavelet_decomposition(target)
    ref_low = a_trous_low(target)
    assert (low.double() - ref_low).abs().max().item() < 1e-6
    assert (high.double() - (target.double() - ref_low)).abs().max().item() < 2e-6
    fixed = color_fix.apply_color_fix(target, source, "wavelet")
    expected = (target.double() - ref_low + a_trous_low(source)).clamp(0, 1)
    assert (fixed.double() - expected).abs().max().item() < 2e-6


@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
def test_color_fix_from_an_early_reference_equals_the_formula_and_keeps_the_target(method):
    target, source = torch.rand(1, 3, 40, 48) * 1.2 - 0.1, torch.rand(1, 3, 40, 48) * 0.6
    kept = target.clone()
    out = color_fix.fix_colors(target, color_fix.color_reference(source, method), method)
    assert torch.equal(target, kept)
    if method == "adain":
        flat_t, flat_s = target.reshape(1, 3, -1), source.reshape(1, 3, -1)
        mt, st = flat_t.mean(2)[..., None, None], (flat_t.var(2) + 1e-5).sqrt()[..., None, None]
        ms, ss = flat_s.mean(2)[..., None, None], (flat_s.var(2) + 1e-5).sqrt()[..., None, None]
        expected = ((target - mt) / st * ss + ms).clamp(0, 1)
    elif method == "wavelet":
        expected = (color_fix.wavelet_decomposition(target)[0] + color_fix.wavelet_decomposition(source)[1]).clamp(0, 1)
    else:
        expected = target.clamp(0, 1)
    assert torch.equal(out, expected)


def test_nofix_is_the_official_name_of_none():
    """The official scripts' "nofix" is accepted and only clamps, as "none"."""
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(9)) * 1.4 - 0.2
    source = torch.rand(1, 3, 8, 8)
    assert torch.equal(color_fix.apply_color_fix(target, source, "nofix"), target.clamp(0, 1))


def test_posterior_sample_and_mean_are_diffusers_gaussian_scaled():
    """z = 0.18215 · (μ + σ·n) and 0.18215 · μ as diffusers' DiagonalGaussianDistribution gives μ and σ, its log σ²
    clamp included (values from −45 to 35 here, past both ends of it)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from comfyui_diffsr.sr_common.latents import posterior_mean, posterior_sample

    g = torch.Generator().manual_seed(10)
    moments = torch.cat([torch.zeros(2, 4, 3, 5), torch.linspace(-45, 35, 120).reshape(2, 4, 3, 5)], dim=1)
    noise = torch.randn(2, 4, 3, 5, generator=g)
    dist = DiagonalGaussianDistribution(moments)
    torch.testing.assert_close(posterior_sample(moments, noise), 0.18215 * dist.std * noise, rtol=1e-5, atol=0)
    moments[:, :4] = torch.randn(2, 4, 3, 5, generator=g)
    torch.testing.assert_close(posterior_mean(moments), 0.18215 * DiagonalGaussianDistribution(moments).mode())


def test_resize_matches_pil_for_8bit_and_float():
    rgb = (torch.rand(1, 3, 13, 17) * 255).round() / 255
    ref = Image.fromarray(image.tensor_to_uint8(rgb)).resize((52, 68), Image.BICUBIC)
    out = image.resize(rgb, (52, 68))
    torch.testing.assert_close(out, image.pil_to_tensor(ref))
    smooth = torch.rand(1, 3, 13, 17) * 0.5 + 0.001  # not 8-bit: float path, no rounding
    out = image.resize(smooth, (52, 68))
    assert not image.is_8bit(out)
    assert out.shape == (1, 3, 68, 52)


def test_pad_and_scaled_size():
    x = torch.rand(1, 3, 13, 21)
    padded, (h, w) = image.pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (16, 24) and (h, w) == (13, 21)
    torch.testing.assert_close(padded[..., :13, :21], x)
    tiny, _ = image.pad_to_multiple(torch.rand(1, 3, 1, 1), 8)
    assert tiny.shape[-2:] == (8, 8)
    assert image.scaled_size(7, 13, 2.5) == (18, 33)


def test_pad_reflects_without_the_edge_and_replicates_where_a_side_is_too_short():
    """Reflect padding mirrors about the last row/column (which is not repeated), as numpy's "reflect"; a side of
    size 4 padded by 4 (to 8) cannot be reflected and both sides are replicated instead, as numpy's "edge"."""
    x = torch.rand(1, 3, 13, 21, generator=torch.Generator().manual_seed(6))
    padded, _ = image.pad_to_multiple(x, 8)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (0, 3)), mode="reflect")
    assert torch.equal(padded, torch.from_numpy(expected))
    square = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    padded, size = image.pad_to_multiple(square, 8)
    assert size == (4, 4)
    assert torch.equal(padded, torch.from_numpy(np.pad(square.numpy(), ((0, 0), (0, 0), (0, 4), (0, 4)), mode="edge")))


def test_scaled_size_rounds_halves_up_on_both_sides():
    """round half up (not Python's round half to even): 2.5·5 = 12.5 → 13, 2.5·7 = 17.5 → 18, 0.5·1 → 1 (at least 1)."""
    assert image.scaled_size(5, 7, 2.5) == (13, 18)
    assert image.scaled_size(7, 5, 2.5) == (18, 13)
    assert image.scaled_size(1, 3, 0.5) == (1, 2)
    assert image.scaled_size(1, 1, 0.1) == (1, 1)


def test_tensor_to_uint8_rounds_to_the_nearest_level():
    """Levels k/255 nudged by ±0.4/255 give k (rounding, not truncation, which would give k − 1 below)."""
    levels = torch.arange(1, 255, dtype=torch.float64)
    values = torch.cat([levels - 0.4, levels + 0.4]) / 255
    out = image.tensor_to_uint8(values.float().reshape(1, 1, 1, -1).expand(1, 3, 1, -1))
    assert out.shape == (1, 2 * 254, 3)
    assert np.array_equal(out[0, :, 0], np.concatenate([levels.numpy(), levels.numpy()]).astype(np.uint8))


def test_an_8bit_image_a_float_rounding_off_resizes_as_its_8bit_values():
    """Values within 1e-4 levels of k/255 (an 8-bit image after float arithmetic) are 8-bit: resized from the nearest
    8-bit levels (PIL's 8-bit path), also where they lie just below a level. Values 0.005 levels off are not 8-bit."""
    rgb = (torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(8)) * 254).round().add(1) / 255
    expected = image.pil_to_tensor(Image.fromarray(
        (rgb[0].permute(1, 2, 0).double() * 255).round().byte().numpy()).resize((52, 68), Image.BICUBIC))
    nudged = rgb - 0.5e-4 / 255  # half a 1e-4 level below each level: within is_8bit's tolerance
    assert image.is_8bit(nudged)
    assert torch.equal(image.resize(nudged, (52, 68)), expected)
    assert not image.is_8bit(rgb + 0.005 / 255)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/_diffsr_pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the evil pickle is of protocol 4
def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/_diffsr_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pkl"
    torch.save({"x": _Boom()}, path)
    with pytest.raises(WeightFileError, match="could run code"):
        read_state_dict(path)
    assert not os.path.exists(marker)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    with pytest.raises(WeightFileError):
        read_state_dict(legacy)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"not a model at all"])
def test_broken_files_are_refused(tmp_path, content):
    for name in ("x.safetensors", "x.pth"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightFileError, match="x\\."):
            read_state_dict(path)


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="truncated"):
        read_state_dict(path)
    with pytest.raises(WeightFileError, match="exists"):
        write_safetensors({"a": torch.zeros(1)}, tmp_path / "w.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_weight_file_has_the_users_default_permissions(tmp_path, umask):
    """A converted file is as readable as any new file of the user's (a ComfyUI server run as another user can load
    it), and no ``.partial`` is left."""
    old = os.umask(umask)
    try:
        write_safetensors({"a": torch.ones(3)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "w.safetensors").st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_a_weight_file_with_a_name_of_the_longest_length_is_written(tmp_path):
    """A name of 255 bytes, the most a file name may have, is written: the temporary name beside it is short."""
    name = "w" * (255 - len(".safetensors")) + ".safetensors"
    write_safetensors({"a": torch.ones(3)}, tmp_path / name)
    assert os.listdir(tmp_path) == [name]


def test_a_pickle_named_safetensors_is_refused_as_a_pickle(tmp_path):
    """A user who renamed a .pth to .safetensors (believing that makes it safe) is told it is a pickle that could
    run code, even when this one holds plain tensors: it is not loaded as if it were safetensors."""
    path = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(WeightFileError, match="named .safetensors but is a PyTorch pickle"):
        read_state_dict(path)


def test_a_safetensors_file_with_a_pickle_name_is_refused(tmp_path):
    """A safetensors file named .pth is not passed to torch.load: the user is told to rename it."""
    path = tmp_path / "weights.pth"
    write_safetensors({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    os.rename(tmp_path / "w.safetensors", path)
    with pytest.raises(WeightFileError, match="safetensors file with a '.pth' name; rename it"):
        read_state_dict(path)


def test_an_empty_or_html_weight_file_is_named_for_what_it_is(tmp_path):
    """A 0-byte file (an unfinished copy) says it is empty, and a login page saved as .pth says it is an HTML
    page, not that it "contains Python objects that could run code"."""
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightFileError, match="is empty .0 bytes."):
        read_state_dict(empty)
    page = tmp_path / "page.pth"
    page.write_bytes(b"<!DOCTYPE html><html>login</html>")
    with pytest.raises(WeightFileError, match="it is an HTML page") as refused:
        read_state_dict(page)
    assert "could run code" not in str(refused.value)
    binary = tmp_path / "binary.pth"  # valid UTF-8, but with control bytes no text has (0x0e-0x1f)
    binary.write_bytes(b"\x1f\x1e\x0e\x10 header" + b"\x11data" * 10)
    with pytest.raises(WeightFileError, match=r"it is not a weight file \(unknown binary format\)"):
        read_state_dict(binary)


def test_a_failed_weight_write_leaves_nothing_at_the_output(tmp_path, monkeypatch):
    """A disk that fills up while a converted file is written leaves no half file under the output name (it would
    look like a finished conversion and be refused as damaged later) and no temporary file."""
    from comfyui_diffsr.sr_common import weights

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", disk_full)
    with pytest.raises(WeightFileError, match="Cannot write .*No space left"):
        write_safetensors({"a": torch.ones(3)}, tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


def test_a_weight_file_is_written_only_under_a_safetensors_name(tmp_path):
    """An output named .pth would be a safetensors file the loaders refuse by its name: refused before writing."""
    with pytest.raises(WeightFileError, match="must end in .safetensors"):
        write_safetensors({"a": torch.ones(3)}, tmp_path / "w.pth")
    assert os.listdir(tmp_path) == []


def test_as_float32_cpu_converts_into_one_buffer_and_keeps_float32():
    keep = torch.randn(3, 4)
    tensors = {"a": torch.randn(5, 2).half(), "keep": keep, "b": torch.randn(7).bfloat16(), "s": torch.tensor(2.5).half()}
    out = as_float32_cpu(tensors)
    assert out["keep"] is keep
    for k in ("a", "b", "s"):
        assert out[k].dtype == torch.float32 and out[k].shape == tensors[k].shape and out[k].is_contiguous()
        assert torch.equal(out[k], tensors[k].float())
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr()  # one buffer
    assert as_float32_cpu({"keep": keep})["keep"] is keep  # nothing to convert: no buffer


def test_safetensors_mapped_and_in_memory_reads_give_the_tensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i64": torch.arange(5), "flag": torch.tensor([True, False]), "scalar": torch.tensor(1.5),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "mix.safetensors"
    save_file(tensors, path, metadata={"a": "b"})
    mapped, owned = read_state_dict(path), read_state_dict(path, mmap=False)
    assert owned.keys() == mapped.keys() == tensors.keys()
    for k, v in tensors.items():
        for read in (owned, mapped):
            assert read[k].dtype == v.dtype and read[k].shape == v.shape and torch.equal(read[k], v), k
    before = path.read_bytes()
    mapped["f32"] += 1  # copy-on-write: the file is never written
    assert path.read_bytes() == before and torch.equal(read_state_dict(path)["f32"], tensors["f32"])
    path.write_bytes(b"\0" * path.stat().st_size)  # the file changes: what was read does not
    assert torch.equal(owned["f32"], tensors["f32"])
    owned["f32"] += 1  # and it is ours to write


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}], ids=["none", "empty", "format"])
def test_the_metadata_reader_tells_no_metadata_from_empty_metadata(tmp_path, metadata):
    """``stored_metadata`` gives the metadata as stored (None where the file has none, as transformers 4.40-4.47 read
    it), ``safetensors_metadata`` {} for both; a damaged file is refused by name by both."""
    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common.weights import safetensors_metadata, stored_metadata

    path = tmp_path / "part.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata=metadata)
    assert stored_metadata(path) == metadata and (stored_metadata(path) is None) == (metadata is None)
    assert safetensors_metadata(path) == (metadata or {})
    path.write_bytes(path.read_bytes()[:-4])
    for read in (stored_metadata, safetensors_metadata):
        with pytest.raises(WeightFileError, match=r"^Cannot read 'part\.safetensors' as safetensors .* truncated or "
                                                  "damaged"):
            read(path)


def test_safetensors_read_into_memory_as_float32_converts_only_floats(tmp_path):
    from safetensors.torch import save_file

    tensors = {"f16": torch.randn(3, 7).half(), "bf16": torch.randn(5).bfloat16(), "f64": torch.randn(2, 2).double(),
               "f32": torch.randn(4), "i64": torch.arange(3), "flag": torch.tensor([True]), "e": torch.zeros(0, 2).half()}
    save_file(tensors, tmp_path / "mix.safetensors")
    read = read_state_dict(tmp_path / "mix.safetensors", mmap=False, float32=True)
    assert read.keys() == tensors.keys()
    for k, v in tensors.items():
        want = v.float() if v.is_floating_point() else v
        assert read[k].dtype == want.dtype and read[k].shape == want.shape and torch.equal(read[k], want), k
    assert read["f16"].untyped_storage().data_ptr() == read["i64"].untyped_storage().data_ptr()  # one buffer


def test_stored_as_float32_reads_the_header(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2), "step": torch.tensor(3)}, tmp_path / "fp32.safetensors")
    save_file({"w": torch.zeros(2).half(), "b": torch.zeros(2)}, tmp_path / "mixed.safetensors")
    torch.save({"w": torch.zeros(2).half()}, tmp_path / "w.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json")
    assert stored_as_float32(tmp_path / "fp32.safetensors")
    assert not stored_as_float32(tmp_path / "mixed.safetensors")
    assert stored_as_float32(tmp_path / "w.ckpt")  # pickles: unknown until loaded, read as float32 files are
    assert stored_as_float32(tmp_path / "bad.safetensors")  # damaged: left to read_state_dict's error


def test_a_safetensors_file_with_a_header_of_hundreds_of_kb_is_read(tmp_path):
    """A model of thousands of tensors has a JSON header of hundreds of KB: it is safetensors (safetensors itself
    takes headers up to 100 MB), read mapped or into memory and checked."""
    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common.weights import check_weight_file, sniff

    tensors = {f"model.diffusion_model.output_blocks.{i}.1.transformer_blocks.0.norm1.bias": torch.full((2,), float(i))
               for i in range(4000)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, path)
    assert int.from_bytes(path.read_bytes()[:8], "little") > 300_000
    assert sniff(path) == "safetensors"
    check_weight_file(path)
    for read in (read_state_dict(path), read_state_dict(path, mmap=False)):
        assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())


def test_a_pickle_in_torchs_legacy_format_is_read(tmp_path):
    """A checkpoint saved in PyTorch's format before 1.6 (``_use_new_zipfile_serialization=False``: a plain pickle,
    not a zip) is read, without the memory-mapping torch.load allows only for zip files."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3).half()}
    path = tmp_path / "old.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"
    read = read_state_dict(path)
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) and read[k].dtype == v.dtype
                                                 for k, v in tensors.items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_of_a_later_protocol_is_read_as_a_pickle(tmp_path):
    """A plain pickle of protocol 4 (torch.save's legacy format with pickle_protocol=4) is a pickle: read by torch's
    weights-only reader, or where that cannot open it refused with the way to convert it, never called "not a
    weight file"."""
    path = tmp_path / "p4.pth"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert path.read_bytes()[:2] == b"\x80\x04"
    try:
        read = read_state_dict(path)
    except WeightFileError as e:  # torch 2.13's weights-only reader: "Unsupported operand 149"
        assert re.search(r"Refusing to open 'p4.pth'.*If you trust the file, convert it", str(e)), str(e)
    else:  # a torch whose weights-only reader takes protocol 4
        assert torch.equal(read["w"], torch.zeros(2))


@pytest.mark.parametrize("mmap", [True, False])
def test_a_safetensors_dtype_the_pack_does_not_read_is_named(tmp_path, mmap):
    """A valid safetensors file holding a dtype the pack does not read (float8, as some quantised checkpoints) is
    refused naming the tensor, the dtype and the fix, not called truncated or damaged. Written byte by byte as the
    format says (8-byte header length, JSON header, data), since safetensors before 0.4.3 cannot write float8."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "q": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [8, 10]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "fp8.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(10))
    with pytest.raises(WeightFileError, match=r"'fp8.safetensors': tensor 'q' has dtype F8_E4M3, which this pack "
                                              "does not read: use a float32 or float16 copy") as refused:
        read_state_dict(path, mmap=mmap)
    assert "damaged" not in str(refused.value)


def test_a_weight_file_is_written_from_non_contiguous_tensors(tmp_path):
    """Tensors that are views in another layout (a transpose) are written as their values."""
    x = torch.arange(6.0).reshape(2, 3)
    write_safetensors({"t": x.t(), "s": x[:, ::2]}, tmp_path / "views.safetensors")
    read = read_state_dict(tmp_path / "views.safetensors")
    assert torch.equal(read["t"], x.t()) and torch.equal(read["s"], x[:, ::2])


def test_module_weights_are_new_only_when_every_tensor_is_new():
    """``load_module_weights`` returns True only when every tensor is a new one (converted from another dtype):
    float32 CPU tensors are the caller's own, taken as they are, in a module filled with both."""
    from comfyui_diffsr.sr_common.weights import load_module_weights

    weight, bias = torch.randn(3, 2), torch.randn(3)
    for state, new in (({"weight": weight.half(), "bias": bias.half()}, True),
                       ({"weight": weight, "bias": bias.half()}, False), ({"weight": weight, "bias": bias}, False)):
        module = torch.nn.Linear(2, 3)
        assert load_module_weights(module, state, "net") is new
        assert (module.weight.data_ptr() == weight.data_ptr()) is (state["weight"] is weight)
        torch.testing.assert_close(module.bias, bias, atol=1e-3, rtol=1e-3)


def test_module_weights_with_a_key_the_module_lacks_are_refused():
    """A state dict with every key the module expects and one more (another architecture's) is refused, naming
    the key and the fix, and the module is left as it was."""
    from comfyui_diffsr.sr_common.weights import load_module_weights

    module = torch.nn.Linear(2, 3)
    before = module.weight.clone()
    state = {"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "norm.weight": torch.ones(3)}
    with pytest.raises(WeightFileError, match=r"The net in 'w.safetensors' does not match the architecture: 1 "
                                              r"unexpected key\(s\) \(e.g. \['norm.weight'\]\)\. pass a config"):
        load_module_weights(module, state, "net", "/models/w.safetensors")
    assert torch.equal(module.weight, before)


def test_a_buffer_left_on_the_meta_device_is_named():
    """A module built on the meta device whose state dict lacks a buffer other than CLIP's ``position_ids`` (the
    one no state dict carries, made again) is refused by the buffer's name, not left on the meta device."""
    from comfyui_diffsr.sr_common.weights import load_module_weights

    with torch.device("meta"):
        module = torch.nn.Linear(2, 3)
        module.register_buffer("scale", torch.ones(3), persistent=False)
    with pytest.raises(RuntimeError, match="Linear.scale is not in the state dict and was built on the meta device"):
        load_module_weights(module, {"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, "net")


def test_fresh_float32_cpu_outlives_its_maker_and_is_writable():
    import gc

    views = [fresh_float32_cpu(1 << 20)[5:9] for _ in range(3)]  # only views survive
    gc.collect()
    for i, v in enumerate(views):
        v.fill_(i + 0.5)
    gc.collect()
    assert [v.tolist() for v in views] == [[i + 0.5] * 4 for i in range(3)]
    assert fresh_float32_cpu(0).shape == (0,) and fresh_float32_cpu(3).dtype == torch.float32


def test_safetensors_reads_unaligned_tensors(tmp_path):
    """A header whose length is not a multiple of 8, and a float32 tensor at an odd offset (other writers than
    safetensors' own may produce both): read by value, mapped and in memory."""
    import json
    import struct

    a, b = torch.arange(3, dtype=torch.uint8), torch.tensor([1.5, -2.0])
    header = json.dumps({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}).encode()
    header += b" " * ((2 - 8 - len(header)) % 8)  # data starts at 2 mod 8: b at 5 mod 8 in the file, 3 in the data
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + a.numpy().tobytes() + b.numpy().tobytes())
    for mmap in (True, False):
        read = read_state_dict(path, mmap=mmap)
        assert torch.equal(read["a"], a) and torch.equal(read["b"], b)


def test_safetensors_conversion_in_pieces_and_reader_errors(tmp_path, monkeypatch):
    """Tensors larger than a piece are converted piece by piece; an error in the reading thread reaches the caller."""
    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common import weights

    monkeypatch.setattr(weights, "PIECE", 64)  # bytes: 32 fp16 values per piece
    tensors = {"big": torch.randn(7, 33).half(), "mid": torch.randn(32).bfloat16(), "keep": torch.randn(50),
               "small": torch.randn(3).half()}
    save_file(tensors, tmp_path / "t.safetensors")
    read = read_state_dict(tmp_path / "t.safetensors", mmap=False, float32=True)
    for k, v in tensors.items():
        assert read[k].dtype == torch.float32 and torch.equal(read[k], v.float()), k

    def fail(f, offset, view):
        raise OSError("disk went away")

    monkeypatch.setattr(weights, "_read_exactly", fail)
    with pytest.raises(WeightFileError, match="disk went away"):
        read_state_dict(tmp_path / "t.safetensors", mmap=False, float32=True)


def test_prefaulting_faults_pages_in_ahead_and_keeps_what_is_written(monkeypatch):
    """The pages of new memory are faulted in by the second thread (writing them afterwards faults almost none), and
    what the body writes meanwhile stays written (the kernel leaves present pages alone)."""
    import ctypes
    import resource
    import threading

    from comfyui_diffsr.sr_common import weights

    def faults_while_filling(buffer):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer.fill_(1.5)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    numel = 16 << 20  # 64 MB, 16384 pages of 4 KB
    plain, ahead = weights.fresh_float32_cpu(numel), weights.fresh_float32_cpu(numel)
    weights._prefault_in_order(ahead.data_ptr(), numel * 4, threading.Event())
    plain_faults, ahead_faults = faults_while_filling(plain), faults_while_filling(ahead)
    libc, page = ctypes.CDLL(None, use_errno=True), weights.fresh_float32_cpu(1024)
    if libc.madvise(ctypes.c_void_p(page.data_ptr()), ctypes.c_size_t(4096), weights.MADV_POPULATE_WRITE) != 0:
        pytest.skip(f"this kernel lacks MADV_POPULATE_WRITE (errno {ctypes.get_errno()})")
    assert plain_faults > 8000 and ahead_faults < 500, (plain_faults, ahead_faults)

    monkeypatch.setattr(weights, "PREFAULT_STEP", 1 << 16)  # many small steps, interleaved with the writes
    buffer = weights.fresh_float32_cpu(numel)
    with weights.prefaulting(buffer):
        for start in range(0, numel, 1 << 18):
            buffer[start:start + (1 << 18)] = start
    assert torch.equal(buffer.view(-1, 1 << 18)[:, 0], torch.arange(0, numel, 1 << 18, dtype=torch.float32))
    assert torch.equal(buffer.view(-1, 1 << 18).amin(1), buffer.view(-1, 1 << 18).amax(1))
    with weights.prefaulting(torch.empty(0)):  # nothing to fault in
        pass


def test_safetensors_in_memory_reads_consecutive_tensors_at_once(tmp_path, monkeypatch):
    """Tensors that follow on in the file and in memory are read in one call (the reading thread then rarely waits
    for the interpreter lock); an odd-sized one (padded in memory) starts a new read. Values as written."""
    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common import weights

    tensors = {"a": torch.randn(4, 6), "b": torch.randn(10), "c": torch.randn(3), "d": torch.randn(2, 2),
               "e": torch.randn(5).half()}  # file order a b c d e; c is 12 bytes, padded to 16 in memory
    save_file(tensors, tmp_path / "t.safetensors")
    reads = []
    read_exactly = weights._read_exactly
    monkeypatch.setattr(weights, "_read_exactly", lambda f, offset, view: (reads.append(len(view)),
                                                                          read_exactly(f, offset, view)))
    read = read_state_dict(tmp_path / "t.safetensors", mmap=False)
    assert all(torch.equal(read[k], v) for k, v in tensors.items())
    assert reads == [4 * (24 + 10 + 3), 4 * 4 + 2 * 5]  # a b c, then d e (e read in place: not converted)


def test_move_module_casts_without_diffusers_warning(tiny_unet_vae, caplog):
    """diffusers' ``to`` warns about any cast ("should be kept in float32: []"); ``move_module`` casts and moves
    silently, as ``torch.nn.Module.to``."""
    import copy
    import logging

    from comfyui_diffsr.sr_common.sd21 import move_module

    vae = copy.deepcopy(tiny_unet_vae[1])
    with caplog.at_level(logging.WARNING):
        assert move_module(vae, "cpu", torch.float16) is vae
        move_module(vae, None, None)
    assert {p.dtype for p in vae.parameters()} == {torch.float16} and not caplog.records
    if version.parse(diffusers.__version__) >= version.parse("0.39"):  # where diffusers' `to` began to warn
        with caplog.at_level(logging.WARNING):
            vae.to(dtype=torch.float32)
        assert "kept in float32" in caplog.text  # the warning this avoids

@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
def test_colour_fix_moves_to_the_cpu_when_the_device_is_out_of_memory(monkeypatch, method):
    """Out of device memory, the reference and the fix run again on the CPU tensors, with the same result; the
    target is left as it was."""
    g = torch.Generator().manual_seed(0)
    target, source = torch.rand(1, 3, 40, 48, generator=g), torch.rand(1, 3, 40, 48, generator=g)
    expected = color_fix.fix_colors(target, color_fix.color_reference(source, method), method)
    kept = target.clone()
    for name in ("_color_reference", "_fix_colors"):
        real, calls = getattr(color_fix, name), []

        def first_out_of_memory(*args, real=real, calls=calls):
            calls.append([a for a in args if torch.is_tensor(a)])
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
            return real(*args)

        monkeypatch.setattr(color_fix, name, first_out_of_memory)
    out = color_fix.fix_colors(target, color_fix.color_reference(source, method), method)
    assert torch.equal(out, expected) and torch.equal(target, kept)
    with pytest.raises(ValueError, match="color_fix"):
        color_fix.fix_colors(target, None, "bogus")


def test_save_image_failing_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    from comfyui_diffsr.cli.common import save_image

    out = tmp_path / "x.png"
    out.write_bytes(b"earlier output")

    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half a PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(DiffSRError, match="Cannot write .*x.png.*No space left"):
        save_image(torch.rand(1, 3, 4, 4), str(out))
    assert os.listdir(tmp_path) == ["x.png"] and out.read_bytes() == b"earlier output"
    monkeypatch.undo()
    save_image(torch.ones(1, 3, 4, 5), str(out), overwrite=True)
    assert Image.open(out).size == (5, 4) and os.listdir(tmp_path) == ["x.png"]


def test_save_image_replaces_a_file_only_with_overwrite(tmp_path, monkeypatch):
    """A file at the output name, made after the outputs were planned, or a link to nothing there, is not written
    over without --overwrite (it was, by the rename): refused, with nothing left behind; also where the file system
    has no hard links."""
    from comfyui_diffsr.cli.common import OutputMadeMeanwhile, save_image

    out = tmp_path / "x.png"
    out.write_bytes(b"made by another run")
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    for kept in (out, tmp_path / "link.png"):
        with pytest.raises(OutputMadeMeanwhile, match="was made since this run started.*--overwrite to replace it"):
            save_image(torch.rand(1, 3, 4, 4), str(kept))
    assert out.read_bytes() == b"made by another run"
    assert os.readlink(tmp_path / "link.png") == str(tmp_path / "gone.png")
    assert sorted(os.listdir(tmp_path)) == ["link.png", "x.png"]

    def no_hard_links(src, dst, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # as vfat says

    monkeypatch.setattr(os, "link", no_hard_links)
    with pytest.raises(OutputMadeMeanwhile):
        save_image(torch.rand(1, 3, 4, 4), str(out))
    save_image(torch.ones(1, 3, 4, 5), str(tmp_path / "new.png"))
    monkeypatch.undo()
    save_image(torch.ones(1, 3, 4, 5), str(out), overwrite=True)
    save_image(torch.ones(1, 3, 4, 5), str(tmp_path / "new2.png"))
    assert Image.open(out).size == Image.open(tmp_path / "new.png").size == Image.open(tmp_path / "new2.png").size
    assert sorted(os.listdir(tmp_path)) == ["link.png", "new.png", "new2.png", "x.png"]
    with pytest.raises(DiffSRError, match="File exists.*Check that its folder is writable"):  # a file, not a folder
        save_image(torch.ones(1, 3, 4, 5), str(out / "y.png"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_is_on_the_disk_before_it_has_its_name(tmp_path, monkeypatch, overwrite):
    """The written file is flushed to the disk (fsync) before it is given the output name: otherwise a power cut
    can leave an empty file under the name (ext4 and XFS commit a new name before delayed data), which
    --skip-existing then takes as done."""
    from comfyui_diffsr.cli.common import save_image

    synced, named, real_fsync, real_link, real_replace = set(), [], os.fsync, os.link, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def naming(real):
        def name(src, dst, *args, **kwargs):
            named.append(os.stat(src).st_ino in synced)
            return real(src, dst, *args, **kwargs)
        return name

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", naming(real_link))
    monkeypatch.setattr(os, "replace", naming(real_replace))
    save_image(torch.rand(1, 3, 4, 4), str(tmp_path / "x.png"), overwrite=overwrite)
    assert named == [True] and Image.open(tmp_path / "x.png").size == (4, 4)


KILLED_WRITER = """
import sys, time
import torch
from PIL import Image
from comfyui_diffsr.cli.common import save_image

def stuck(self, fp, *args, **kwargs):  # half written when the writer is killed
    with open(fp, "wb") as f:
        f.write(b"half a PNG")
    print(fp, flush=True)
    time.sleep(300)

Image.Image.save = stuck
save_image(torch.rand(1, 3, 4, 4), sys.argv[1])
"""


def test_a_partial_file_left_by_a_killed_writer_is_removed_by_the_next_run(tmp_path, capsys, child_env):
    """A writer killed (SIGKILL, a power cut) while it wrote an output left its hidden partial file in the user's
    output folder for good: the next run into that folder removes it, with a note, even where every output is
    there. It keeps whatever it cannot prove a killed writer's: a live writer's partial file (this process's, or
    another process's here), one from another machine or container, a user's file of another name, a folder."""
    import subprocess
    import sys

    from comfyui_diffsr.cli.common import plan_outputs
    from comfyui_diffsr.sr_common.weights import partial_path

    folder = tmp_path / "out" / "2019"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder / "a.png")], stdout=subprocess.PIPE,
                              text=True, env=child_env())
    killed = writer.stdout.readline().strip()
    writer.kill()
    writer.wait()
    writer.stdout.close()
    assert os.listdir(folder) == [os.path.basename(killed)] and open(killed, "rb").read() == b"half a PNG"
    (tmp_path / "a.png").write_bytes(b"an input")
    (folder / "a.png").write_bytes(b"written by a later run")
    plan = [(str(tmp_path / "a.png"), "2019/a")]
    assert plan_outputs(plan, str(tmp_path / "out"), skip_existing=True) == []
    assert os.listdir(folder) == ["a.png"]
    assert capsys.readouterr().err.splitlines() == [
        "skipping 1 of 1 image(s): their output exists (--skip-existing)",
        f"note: removed 1 unfinished file(s) of a run stopped while writing (killed, or a power cut): {killed}"]

    live = partial_path(folder / "b.png")
    open(live, "wb").close()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _, _, machine, rest = os.path.basename(live).split("-")
        kept = {"a.png", os.path.basename(live), f".diffsr-{running.pid}-{machine}-{rest}",
                f".diffsr-{writer.pid}-{int(machine, 16) ^ 1:08x}-{rest}",  # another machine's or container's
                f".diffsr-{writer.pid}-{machine}-{rest}.txt", ".diffsr-partial-notes.partial"}
        for name in kept - set(os.listdir(folder)):
            (folder / name).write_bytes(b"kept")
        os.mkdir(folder / f".diffsr-{writer.pid}-{machine}-00000000.partial")
        kept.add(f".diffsr-{writer.pid}-{machine}-00000000.partial")
        assert plan_outputs(plan, str(tmp_path / "out"), skip_existing=True) == []
    finally:
        running.kill()
        running.wait()
    assert set(os.listdir(folder)) == kept
    assert "note: removed" not in capsys.readouterr().err


@pytest.mark.skipif(os.name == "nt", reason="partial files are never removed on Windows")
def test_a_partial_file_whose_writer_cannot_be_asked_about_is_kept(tmp_path, monkeypatch):
    """A partial file of this machine whose writer cannot be asked whether it runs may still be being written: a
    process id too large to ask about (``os.kill``: OverflowError), another user's process (PermissionError). It is
    kept."""
    import errno

    from comfyui_diffsr.sr_common import weights

    machine = weights._machine_tag()
    huge, another_users = (f".diffsr-{pid}-{machine}-0badcafe.partial" for pid in (2 ** 70, 4242))
    (tmp_path / huge).write_bytes(b"kept")
    assert weights.remove_abandoned_partials(str(tmp_path)) == []

    def not_permitted(pid, signal):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    (tmp_path / another_users).write_bytes(b"kept")
    assert weights.remove_abandoned_partials(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == sorted([huge, another_users])


@pytest.mark.skipif(os.name == "nt", reason="partial files are never removed on Windows")
def test_a_live_writer_on_another_machine_of_the_same_host_name_keeps_its_partial_file(tmp_path, monkeypatch):
    """Two machines of one host name (a default one: ubuntu, raspberrypi) writing into one network folder, each in
    its first PID namespace (whose id is one constant on every Linux machine), tagged their partial files alike: a
    run on one removed the partial file of a live writer on the other, whose process id does not run here. Their
    machine ids tell them apart. A host name that is not UTF-8 (Python's surrogate escapes) names partial files
    too (it stopped every output with UnicodeEncodeError)."""
    import socket
    import subprocess
    import sys

    from comfyui_diffsr.sr_common import weights

    monkeypatch.setattr(socket, "gethostname", lambda: "ubuntu")
    monkeypatch.setattr(os, "readlink", lambda path: "pid:[4026531836]")
    machine_id = tmp_path / "machine-id"
    monkeypatch.setattr(weights, "MACHINE_ID_FILES", (str(tmp_path / "missing"), str(machine_id)), raising=False)
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    other = weights._machine_tag()
    machine_id.write_text("fedcba9876543210fedcba9876543210\n")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / f".diffsr-{int(gone.stdout)}-{other}-0badcafe.partial").write_bytes(b"written on the other machine")
    assert weights.remove_abandoned_partials(str(folder)) == []
    assert len(os.listdir(folder)) == 1

    monkeypatch.setattr(socket, "gethostname", lambda: "caf\udce9")  # the bytes caf\xe9 (Latin-1)
    assert weights.PARTIAL_NAME.fullmatch(os.path.basename(weights.partial_path(folder / "a.png")))


def test_exif_that_cannot_be_kept_costs_the_tags_not_the_image(tmp_path, capsys, monkeypatch):
    """An EXIF too long for a JPEG segment, or one PIL cannot write again, is left out with a note; the image is
    written all the same (and a PNG keeps the long EXIF)."""
    from comfyui_diffsr.cli.common import PhotoMetadata, save_image

    exif = Image.Exif()
    exif[0x010E] = "x" * 70000  # ImageDescription
    long = PhotoMetadata(exif=exif.tobytes())
    save_image(torch.rand(1, 3, 4, 4), str(tmp_path / "a.jpg"), long)
    assert f"note: {tmp_path / 'a.jpg'}: the EXIF (70" in capsys.readouterr().err  # named: which photo of a folder
    assert not Image.open(tmp_path / "a.jpg").getexif()
    save_image(torch.rand(1, 3, 4, 4), str(tmp_path / "a.png"), long)
    assert Image.open(tmp_path / "a.png").getexif()[0x010E] == "x" * 70000
    def unwritable(self):
        raise ValueError("a tag type PIL cannot write")

    monkeypatch.setattr(Image.Exif, "tobytes", unwritable)
    save_image(torch.rand(1, 3, 4, 4), str(tmp_path / "b.png"), long)
    err = capsys.readouterr().err
    assert f"note: {tmp_path / 'b.png'}: the EXIF cannot be written again (ValueError: a tag type" in err
    monkeypatch.undo()
    assert Image.open(tmp_path / "b.png").size == (4, 4) and not Image.open(tmp_path / "b.png").getexif()


def _folder(tmp_path, count):
    from PIL import Image

    pairs = []
    for i in range(count):
        path = tmp_path / f"in{i}.png"
        Image.fromarray(torch.full((4, 6, 3), 40 * i + 10, dtype=torch.uint8).numpy()).save(path)
        pairs.append((str(path), str(tmp_path / "out" / f"in{i}.png")))
    return pairs


def test_folder_run_writes_an_output_beside_the_next_upscale(tmp_path, monkeypatch):
    """The first output is written while the second image is upscaled: its writer waits for that upscale to start,
    which would never happen if the two ran one after the other."""
    import threading

    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 3)
    second_started, real_save = threading.Event(), common.save_image

    def save_after_second_started(image01, path, *profile):
        if path.endswith("in0.png"):
            assert second_started.wait(60), "the first output was not written beside the second upscale"
        real_save(image01, path, *profile)

    def upscale_one(image, out):
        if out.endswith("in1.png"):
            second_started.set()
        return 1 - image

    monkeypatch.setattr(common, "save_image", save_after_second_started)
    assert common.upscale_all(pairs, upscale_one, "test") == 0
    for path, out in pairs:
        assert torch.equal(common.load_image(out), 1 - common.load_image(path))


def test_folder_run_stops_when_an_output_cannot_be_written(tmp_path, monkeypatch):
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 3)
    real_save = common.save_image

    def full_after_first(image01, path, *profile):
        if not path.endswith("in0.png"):
            raise DiffSRError(f"Cannot write {path!r}: No space left on device.")
        real_save(image01, path, *profile)

    monkeypatch.setattr(common, "save_image", full_after_first)
    with pytest.raises(DiffSRError, match="in1.png.*No space"):
        common.upscale_all(pairs, lambda image, out: image, "test")
    assert os.listdir(tmp_path / "out") == ["in0.png"]


@pytest.mark.parametrize("full_at", ["in2.png", "in3.png"])
def test_a_run_stopped_by_an_output_that_cannot_be_written_still_sums_up(tmp_path, monkeypatch, capsys, full_at):
    """An image failed earlier (unreadable) and then an output cannot be written (in the run, or the last): the
    images written, the failures and the number left are listed before the run stops, as when the weights do not
    fit; they were not, so the earlier failure was named only far up in the output."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 4)
    (tmp_path / "in1.png").write_bytes(b"not an image")
    real_save = common.save_image

    def full_from(image01, path, *profile):
        if path >= str(tmp_path / "out" / full_at):
            raise DiffSRError(f"Cannot write {path!r}: No space left on device.")
        real_save(image01, path, *profile)

    monkeypatch.setattr(common, "save_image", full_from)
    with pytest.raises(DiffSRError, match=f"{full_at}.*No space"):
        common.upscale_all(pairs, lambda image, out: image, "test")
    err = capsys.readouterr().err.splitlines()
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == {"in2.png": ["in0.png"], "in3.png": ["in0.png", "in2.png"]}[full_at]
    left = {"in2.png": 2, "in3.png": 1}[full_at]  # in2's write fails once in3 is upscaled: both are left
    assert err[-3:] == [f"wrote {len(written)} image(s) to {tmp_path / 'out'}",
                        f"error: 1 of 4 image(s) failed: {pairs[1][0]}",
                        f"error: stopped with {left} image(s) left (--skip-existing resumes the run):"], err


def test_a_run_stopped_by_ctrl_c_finishes_the_output_being_written_and_sums_up(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the third upscale: the second output, being written, is finished; the images written, the
    failures and the number left are listed, and the interrupt goes on to the command (exit status 130)."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 5)
    (tmp_path / "in1.png").write_bytes(b"not an image")

    def upscale_one(image, out):
        if out.endswith("in3.png"):
            raise KeyboardInterrupt
        return image

    with pytest.raises(KeyboardInterrupt):
        common.upscale_all(pairs, upscale_one, "test")
    assert sorted(os.listdir(tmp_path / "out")) == ["in0.png", "in2.png"]
    assert capsys.readouterr().err.splitlines()[-3:] == [
        f"wrote 2 image(s) to {tmp_path / 'out'}", f"error: 1 of 5 image(s) failed: {pairs[1][0]}",
        "error: stopped with 2 image(s) left (--skip-existing resumes the run):"]


def test_ctrl_c_counts_an_output_another_run_made_meanwhile_as_done(tmp_path, capsys):
    """With --skip-existing, an image skipped because another run made its output meanwhile is not left: Ctrl-C after
    it counted it among the images left (3 for the 2 not yet begun)."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 4)
    os.mkdir(tmp_path / "out")

    def upscale_one(image, out):
        if out.endswith("in0.png"):  # the other run writes in1's output meanwhile
            with open(pairs[1][1], "wb") as f:
                f.write(b"the other run's")
        if out.endswith("in2.png"):
            raise KeyboardInterrupt
        return image

    with pytest.raises(KeyboardInterrupt):
        common.upscale_all(pairs, upscale_one, "test", skip_existing=True)
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"wrote 1 image(s) to {tmp_path / 'out'}", "error: stopped with 2 image(s) left (--skip-existing resumes the run):"]

def ctrl_c_in_first_wait_for(out):
    """A ThreadPoolExecutor whose future of the job writing ``out`` (``_save_output(new_folder, image01, out, …)``)
    raises KeyboardInterrupt when first waited for (Ctrl-C as the run waits for that output), and then waits as
    usual."""
    from concurrent.futures import ThreadPoolExecutor

    from comfyui_diffsr.cli.common import _save_output

    class CtrlCInFirstWait(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            if fn is _save_output and args[2] == out:
                wait, waited = future.result, []

                def result(timeout=None):
                    if not waited:
                        waited.append(True)
                        raise KeyboardInterrupt
                    return wait(timeout)

                future.result = result
            return future

    return CtrlCInFirstWait


@pytest.mark.parametrize("last_write", ["written", "refused"])
def test_ctrl_c_while_the_last_output_is_written_finishes_it_and_sums_up(tmp_path, monkeypatch, capsys, last_write):
    """Ctrl-C while the run waited for its last output (after the last upscale: a 2048² PNG takes about a second)
    went past the summary: no images written, failures or count, and an output its encoder then refused was not
    named. That output is finished and the run sums up, as for Ctrl-C earlier."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 3)
    (tmp_path / "in0.png").write_bytes(b"not an image")
    real_save = common.save_image

    def save(image01, path, *profile):
        if last_write == "refused" and path == pairs[-1][1]:
            raise ImageInputError(f"Cannot write {path!r}: encoder error. Try --format png.")
        real_save(image01, path, *profile)

    monkeypatch.setattr(common, "save_image", save)
    monkeypatch.setattr(common, "ThreadPoolExecutor", ctrl_c_in_first_wait_for(pairs[-1][1]))
    with pytest.raises(KeyboardInterrupt):
        common.upscale_all(pairs, lambda image, out: image, "test")
    written, failed = (2, [pairs[0][0]]) if last_write == "written" else (1, [pairs[0][0], pairs[2][0]])
    assert sorted(os.listdir(tmp_path / "out")) == ["in1.png", "in2.png"][:written]
    assert capsys.readouterr().err.splitlines()[-3:] == [
        f"wrote {written} image(s) to {tmp_path / 'out'}", f"error: {len(failed)} of 3 image(s) failed: "
        f"{', '.join(failed)}", "error: stopped with 0 image(s) left (--skip-existing resumes the run):"]


def test_a_second_ctrl_c_while_the_output_being_written_is_finished_stops_at_once(tmp_path, monkeypatch, capsys):
    """Ctrl-C during an upscale finishes the output being written before the summary; a second Ctrl-C during that
    wait stops the run at once, without waiting for the write again or summing up."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 3)

    def upscale_one(image, out):
        if out == pairs[1][1]:
            raise KeyboardInterrupt
        return image

    # Ctrl-C again as the run waits for the first output
    monkeypatch.setattr(common, "ThreadPoolExecutor", ctrl_c_in_first_wait_for(pairs[0][1]))
    with pytest.raises(KeyboardInterrupt):
        common.upscale_all(pairs, upscale_one, "test")
    err = capsys.readouterr().err
    assert "wrote" not in err and "stopped with" not in err, err


def test_an_output_its_encoder_refuses_fails_alone_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """Pillow refusing one output (its EXIF too long for a JPEG, were it not left out first: ValueError; an encoder
    error: OSError with no errno) or running out of memory while it is written stopped the folder run (a traceback
    for the last): that image fails, named with the reason, and the others are written. A defect stays loud."""
    from comfyui_diffsr.cli import common
    from comfyui_diffsr.sr_common import image as image_module

    pairs = [(path, out.replace(".png", ".jpg")) for path, out in _folder(tmp_path, 5)]
    exif = Image.Exif()
    exif[0x010E] = "x" * 70000
    Image.open(pairs[1][0]).save(pairs[1][0], exif=exif)
    monkeypatch.setattr(common, "JPEG_EXIF_LIMIT", 10**6)  # as if it were not left out: Pillow refuses it
    real_save, real_to_uint8 = Image.Image.save, image_module.tensor_to_uint8

    def encoder_error(self, *args, **kwargs):
        if self.getpixel((0, 0)) == (90, 90, 90):  # in2
            raise OSError("encoder error -2 when writing image file")
        real_save(self, *args, **kwargs)

    def out_of_memory(image01):
        if round(float(image01[0, 0, 0, 0]) * 255) == 170:  # in4, the last: its write fails after the loop
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")
        return real_to_uint8(image01)

    monkeypatch.setattr(Image.Image, "save", encoder_error)
    monkeypatch.setattr(image_module, "tensor_to_uint8", out_of_memory)
    assert common.upscale_all(pairs, lambda image, out: image, "test") == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["in0.jpg", "in3.jpg"]
    err = capsys.readouterr().err
    written = [f"error: {pairs[i][0]}: Cannot write {quoted_name(pairs[i][1])}: " for i in range(len(pairs))]
    assert written[1] + "EXIF data is too long. Try --format png." in err
    assert written[2] + "encoder error -2 when writing image file" in err
    assert written[4] + "out of memory (OutOfMemoryError: CUDA" in err
    assert err.splitlines()[-2:] == [f"wrote 2 image(s) to {tmp_path / 'out'}",
                                     f"error: 3 of 5 image(s) failed: {pairs[1][0]}, {pairs[2][0]}, {pairs[4][0]}"]

    def defect(image01):
        raise TypeError("a defect of the pack")

    monkeypatch.setattr(image_module, "tensor_to_uint8", defect)
    with pytest.raises(TypeError, match="a defect of the pack"):
        common.upscale_all([(pairs[0][0], str(tmp_path / "out2" / "in0.jpg"))], lambda image, out: image, "test")


@pytest.mark.parametrize("flag", ["", "skip_existing", "overwrite"])
def test_an_output_another_run_made_meanwhile_fails_alone_or_is_skipped(tmp_path, capsys, flag):
    """Two runs into one folder: an output the other run made after this one planned its outputs (found before the
    upscale, or when the output is given its name) stopped this run at the first, with all the rest left. It fails
    that image alone, named, with the fix; with --skip-existing it is skipped with a note, as an output there at
    the start is, and the run ends with status 0; --overwrite replaces it. The other run's file is never written
    over otherwise."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 4)
    os.mkdir(tmp_path / "out")

    def upscale_one(image, out):  # the other run writes in1's output during in0's upscale, in2's during in2's
        other = {"in0.png": pairs[1][1], "in2.png": pairs[2][1]}.get(os.path.basename(out))
        if other:
            with open(other, "wb") as f:
                f.write(b"the other run's")
        return 1 - image

    status = common.upscale_all(pairs, upscale_one, "test", **({flag: True} if flag else {}))
    err = capsys.readouterr().err.splitlines()
    ours = [0, 1, 2, 3] if flag == "overwrite" else [0, 3]
    for i, (path, out) in enumerate(pairs):
        if i in ours:
            assert torch.allclose(common.load_image(out), 1 - common.load_image(path), atol=1e-6)
        else:
            assert open(out, "rb").read() == b"the other run's"
    assert sorted(os.listdir(tmp_path / "out")) == ["in0.png", "in1.png", "in2.png", "in3.png"]
    assert err[-1] == f"wrote {len(ours)} image(s) to {tmp_path / 'out'}" if flag else err[-2:] == [
        f"wrote 2 image(s) to {tmp_path / 'out'}", f"error: 2 of 4 image(s) failed: {pairs[1][0]}, {pairs[2][0]}"]
    assert status == (0 if flag else 2)
    made = [f"its output {quoted_name(out)} was made since this run started (by another run writing to the same "
            "folder?)" for _, out in pairs[1:3]]
    reported = [line for line in err if line.startswith(("error: /", "note: "))]
    if flag == "skip_existing":
        assert reported == [f"note: {pairs[i][0]}: skipped: {made[i - 1]} (--skip-existing)" for i in (1, 2)]
    elif not flag:
        assert reported == [f"error: {pairs[i][0]}: {made[i - 1]} and is left as it is; run again with "
                            "--skip-existing to upscale only the images whose output is missing, or with --overwrite "
                            "to replace it" for i in (1, 2)]
    else:
        assert reported == []


def test_a_folder_run_prints_control_characters_in_names_escaped(tmp_path, capsys):
    """A file name holding a line break, a carriage return or ESC (a terminal's escape sequence) split or rewrote the
    error lines of a folder run: such names are printed with those characters escaped; other names as they are."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 1)
    for name in ("line\nbreak.png", "back\rover.png", "esc\x1b[2Jape.png", "Café 写真.png"):
        (tmp_path / name).write_bytes(b"not an image")
        pairs.append((str(tmp_path / name), str(tmp_path / "out" / name)))
    assert common.upscale_all(pairs, lambda image, out: image, "test") == 2
    err = capsys.readouterr().err
    shown = [os.path.join(tmp_path, name) for name in ("line\\nbreak.png", "back\\rover.png", "esc\\x1b[2Jape.png",
                                                           "Café 写真.png")]
    assert [line.split(": ")[1] for line in err.splitlines() if line.startswith("error: /")] == shown
    assert err.splitlines()[-1] == f"error: 4 of 5 image(s) failed: {', '.join(shown)}"
    assert "\x1b" not in err  # (the progress bar's own carriage returns are in it)
    assert common.shown_name("a\x9b\x7f\u2028\tb") == "a\\x9b\\x7f\\u2028\\tb"


def test_shown_names_escape_bidirectional_controls_and_keep_joiners():
    """A name holding U+202E (right-to-left override) printed reversed: ``invoice\u202egnp.exe`` showed as
    ``invoiceexe.png``, not the file it names ("Trojan Source"). The bidirectional controls are escaped; the joiners
    that emoji sequences and Persian names need are kept."""
    from comfyui_diffsr.sr_common import names

    assert names.shown_name("invoice\u202egnp.exe") == "invoice\\u202egnp.exe"
    bidi = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    assert names.shown_name(f"a{bidi}b") == "a" + "".join(f"\\u{ord(c):04x}" for c in bidi) + "b"
    for kept in ("👩\u200d💻.png", "می\u200cخواهم.png", "Café 写真.png", "\u05e9\u05dc\u05d5\u05dd.png"):
        assert names.shown_name(kept) == kept


def test_shown_names_escape_invisible_format_characters():
    """Two files whose names differ by an invisible character (U+200B zero width space, U+2060 word joiner, U+FEFF,
    U+00AD soft hyphen, or any other Unicode format character, Cf) printed alike in the messages: those are escaped
    too. The joiners are kept where they join (emoji sequences, a skin tone or an emoji's variation selector before
    the joiner; Persian and Indic words), and escaped where they join nothing."""
    from comfyui_diffsr.sr_common import names

    for invisible in ("\u200b", "\u2060", "\ufeff", "\xad", "\u180e", "\U000e0041", "\U0001d173"):
        assert names.shown_name(f"photo{invisible}.png") == f"photo{invisible.encode('unicode_escape').decode()}.png"
    for joiner in ("\u200d", "\u200c"):
        escaped = joiner.encode("unicode_escape").decode()
        for name in ("a{}b.png", "{}💻.png", "👩{}.png", "👩{} 💻", "👩{}\u200b💻", "a{}"):
            assert names.shown_name(name.format(joiner)) == name.format(escaped).replace("\u200b", "\\u200b"), name
    for kept in ("👩\U0001f3fd\u200d💻.png", "❤\ufe0f\u200d🔥.png", "क्\u200dष.png", "می\u200cخواهم.png"):
        assert names.shown_name(kept) == kept


def test_shown_names_escape_joiners_between_letters_of_scripts_that_do_not_join():
    """A joiner between two characters that are not ASCII was kept, wherever they were: 'от\u200dчёт.png' printed as
    'отчёт.png', so in Cyrillic, Greek, Hebrew, Thai or CJK names two files looked like one. Joiners are kept only
    where they shape what is printed: an emoji sequence, a Brahmic conjunct (next to a virama), an Arabic-script
    word."""
    from comfyui_diffsr.sr_common import names

    for joiner in ("\u200d", "\u200c"):
        escaped = joiner.encode("unicode_escape").decode()
        for name in ("от{}чёт.png", "日本{}語.png", "αβ{}γ.png", "שָׁ{}לום.png", "สวั{}สดี.png", "ü{}é.png"):
            assert names.shown_name(name.format(joiner)) == name.format(escaped), name
        assert names.shown_name(f"é{joiner}\u3164.png") == f"é{escaped}\\u3164.png"
    for kept in ("👩\u200d👩\u200d👧.png", "🏳\ufe0f\u200d🌈.png", "🧑🏿\u200d🦰.png", "ന്\u200d.png", "ශ්\u200dය.png",
                 "র\u200d্য.png", "क्\u200cष.png", "نامه\u200cها.png", "ܐ\u200dܒ.png"):
        assert names.shown_name(kept) == kept, kept


def test_shown_names_escape_the_other_invisible_characters():
    """Names printed by the messages escaped Unicode's format characters (Cf), but the other characters a renderer
    shows as nothing or as a blank printed as they were: U+3164 HANGUL FILLER (``\u3164.png`` printed as ``.png``
    with a blank before it), U+FFA0, U+115F, U+1160, U+034F COMBINING GRAPHEME JOINER, the variation selectors
    (``photo\ufe0f.png`` as ``photo.png``), U+2800 BRAILLE PATTERN BLANK. Every Default_Ignorable_Code_Point is
    escaped, and U+2800, except where it shapes a word or an emoji: a variation selector after a symbol or a CJK
    ideograph, or in a keycap; a conjoining Hangul filler inside its syllable; U+2800 between braille cells."""
    from comfyui_diffsr.sr_common import names

    for invisible in ("\u3164", "\uffa0", "\u115f", "\u1160", "\u034f", "\u2800", "\ufe0f", "\ufe00", "\u180b",
                      "\u17b4", "\u2065", "\ufff0", "\U000e0100", "\U000e01f0"):
        escaped = invisible.encode("unicode_escape").decode()
        for name in ("{}.png", "photo{}.png", "a{}b", "{}"):
            assert names.shown_name(name.format(invisible)) == name.format(escaped), name.format(escaped)
    for name, shown in (("1\ufe0f.png", "1\\ufe0f.png"), ("x\u2800⠃", "x\\u2800⠃"),  # no keycap, no braille before
                        ("\u115f\u1160", "\\u115f\\u1160"),  # the two fillers: a syllable of nothing
                        ("❤\ufe0f\ufe0f", "❤\ufe0f\\ufe0f"), ("ᄀ\u3164ᅡ", "ᄀ\\u3164ᅡ")):
        assert names.shown_name(name) == shown, shown
    for kept in ("❤\ufe0f.png", "1\ufe0f\u20e3.png", "#\ufe0f\u20e3", "🏳\ufe0f\u200d🌈.png", "葛\U000e0100城.png",
                 "∩\ufe00", "\u1820\u180b\u1821", "\u115f\u1161.png", "\u1100\u1160\u11a8.png", "⠓⠊\u2800⠞⠓⠑⠗⠑"):
        assert names.shown_name(kept) == kept, kept


def test_shown_names_keep_every_emoji_presentation_sequence():
    """A variation selector was kept after a symbol, digit, punctuation or uncased letter, and escaped after a cased
    one (``é\\ufe0f``, which prints as é), but U+2139 INFORMATION SOURCE is a lowercase letter (Ll) and an emoji:
    ``ℹ\ufe0f.png`` printed as ``ℹ\\ufe0f.png``. Every emoji (the ``regex`` module's Emoji property) but the
    ASCII ones, which take U+FE0F only in a keycap, and those newer than Python's Unicode data keeps its U+FE0F."""
    from comfyui_diffsr.sr_common import names

    regex = pytest.importorskip("regex")
    emoji = regex.compile(r"\p{Emoji}")
    escaped = [hex(cp) for cp in range(0x80, sys.maxunicode + 1) if emoji.match(chr(cp))
               and unicodedata.category(chr(cp)) != "Cn" and names.shown_name(f"{chr(cp)}\ufe0f.png") != f"{chr(cp)}\ufe0f.png"]
    assert escaped == []
    assert names.shown_name("é\ufe0f.png") == "é\\ufe0f.png"


def test_shown_names_keep_the_mongolian_vowel_separator_in_its_word():
    """U+180E MONGOLIAN VOWEL SEPARATOR (a format character since Unicode 6.3, Default_Ignorable) was escaped
    wherever it stood, though inside a Mongolian word, between a letter and the word's final a or e, it picks their
    shapes as the Mongolian variation selectors kept after a letter do: ᠬᠠᠷ\u180eᠠ (qar-a, "black") is drawn
    apart from ᠬᠠᠷᠠ (qara, "to look"). It is kept there, and escaped anywhere else."""
    from comfyui_diffsr.sr_common import names

    for kept in ("ᠬᠠᠷ\u180eᠠ.png", "ᠨᠢᠭᠡ ᠬᠠᠷ\u180eᠠ", "ᠲᠡᠷᠭ\u180eᠡ"):
        assert names.shown_name(kept) == kept
    for name in ("photo\u180e.png", "ᠬᠠᠷ\u180e.png", "\u180eᠠ", "a\u180eᠠ", "ᠬᠠᠷ\u180eᠢ", "ᠬᠠᠷ\u180e\u180eᠠ", "᠐\u180eᠠ"):
        assert names.shown_name(name) == name.replace("\u180e", "\\u180e"), name.encode("unicode_escape")


def test_shown_names_keep_the_flags_of_england_scotland_and_wales():
    """The flags of England, Scotland and Wales are emoji tag sequences: U+1F3F4 black flag, the region's tag
    letters (U+E0067 tag g, …, Cf, invisible) and U+E007F cancel tag. Their tags were escaped as every format
    character (``🏴\\U000e0067\\U000e0062…``), though they shape an emoji as the kept joiners do. The three
    flags are kept whole; tags anywhere else (after another character, another region, no cancel tag) escaped."""
    from comfyui_diffsr.sr_common import names

    def tags(letters):
        return "".join(chr(0xE0000 + ord(letter)) for letter in letters)

    def escaped(text):
        return text.encode("unicode_escape").decode()

    for region in ("gbeng", "gbsct", "gbwls"):
        flag = f"\U0001f3f4{tags(region)}\U000e007f"
        for kept in (f"{flag}.png", f"x{flag}{flag}", f"\U0001f3f4{flag}"):
            assert names.shown_name(kept) == kept, escaped(kept)
    for name in (f"\U0001f3f4{tags('gbxyz')}\U000e007f", f"a{tags('gbeng')}\U000e007f", f"\U0001f3f4{tags('gbeng')}",
                 f"\U0001f3f4{tags('gbengx')}\U000e007f", "\U0001f3f4\U000e007f"):
        assert names.shown_name(name) == name[0] + escaped(name[1:]), escaped(name)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names cannot hold a line break")
def test_the_cores_errors_show_names_as_the_commands_do(tmp_path):
    """The errors of sr_common and the cores, which the commands and the nodes show, named a path with repr(): it
    printed U+3164 HANGUL FILLER (a letter, Default_Ignorable) and the other invisible characters that are not format
    characters as they are, and escaped the joiner of an emoji sequence, where the commands' own lines (``shown_name``)
    do the opposite; an OSError's text names its file with repr() too. A path is shown in quotes as ``shown_name``
    shows it (``quoted_name``), in an OSError's text as well (``error_text``)."""
    from comfyui_diffsr.sr_common.download import DownloadError, download
    from comfyui_diffsr.sr_common.names import shown_name

    for name, shown in (("a\u3164b", "a\\u3164b"), ("x\u202egnp", "x\\u202egnp"), ("a\u200bb", "a\\u200bb"),
                        ("line\nbreak", "line\\nbreak"), ("👩\u200d💻", "👩\u200d💻"), ("Café", "Café")):
        assert shown_name(name) == shown
        with pytest.raises(WeightFileError) as refused:
            read_state_dict(tmp_path / f"{name}.safetensors")
        assert str(refused.value) == (f"Weight file not found: '{tmp_path}/{shown}.safetensors'. Check the path or "
                                      "the model folder.")
        (tmp_path / name).write_bytes(b"a file, not a folder")
        with pytest.raises(DownloadError) as refused:  # (no connection: the folder is refused first)
            download("https://example.com/f.bin", str(tmp_path / name / "sub" / "f.bin"))
        assert str(refused.value) == (f"Cannot make the folder of '{tmp_path}/{shown}/sub/f.bin' ([Errno 20] Not a "
                                      f"directory: '{tmp_path}/{shown}/sub'); choose another models folder.")
    assert shown_name("caf\udce9.png") == "caf\\udce9.png"  # a Linux name that is not UTF-8, as Python decodes it


def test_error_text_keeps_what_an_os_errors_text_says_and_never_raises():
    """``error_text`` rebuilt an OSError's text from its errno and strerror alone: an OSError whose own text says more
    (urllib's URLError naming a file: its reason; Windows' [WinError N]) lost it for "[Errno None] None", and one
    whose second file name is not a path (OSError takes any object there) raised a TypeError inside the message
    meant to report it. Only the file names of its text are shown as ``quoted_name`` shows them."""
    import urllib.error

    from comfyui_diffsr.sr_common.names import error_text

    assert error_text(urllib.error.URLError("No such file", "/m/a\u3164b")) == "<urlopen error No such file>"
    assert error_text(OSError(2, "No such file", "a\u3164b", None, 5)) == "[Errno 2] No such file: 'a\\u3164b' -> 5"
    assert error_text(OSError(18, "Cross-device", "a\u3164", None, b"b\xff")) == (
        "[Errno 18] Cross-device: 'a\\u3164' -> 'b\\udcff'")
    assert error_text(OSError(9, "Bad file descriptor", 3)) == "[Errno 9] Bad file descriptor: 3"
    assert error_text(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"


def test_windows_paths_print_with_their_separators(monkeypatch):
    r"""``escaped_name`` (``diffsr download``'s lines, ``diffsr dape``'s ``<file>`` field) escaped every path holding
    a backslash, which on Windows is every path of a folder: ``diffsr download --models-dir C:\ComfyUI\models``
    printed ``\C:\\ComfyUI\\models\\osediff\\osediff.pkl``, not the path (and dape's tests, which expect the path,
    failed there). No Windows name holds a backslash: there the path is printed as it is unless it holds another
    character to escape or starts with a backslash (``\\server\share``), which the reader would take for an escape;
    elsewhere a backslash is a character of a name and is escaped as before."""
    from comfyui_diffsr.cli.common import escaped_name

    monkeypatch.setattr(os, "sep", "\\")
    for plain in (r"C:\ComfyUI\models\osediff\osediff.pkl", r"models\x1b.png", "ComfyUI/models\\ram\\é.pth"):
        assert escaped_name(plain) == plain
    for path, line in ((r"\\server\share\a.png", r"\\\\\server\\share\\a.png"), (r"\models\a.png", r"\\\models\\a.png"),
                       ("C:\\m\u202e\\a.png", r"\C:\\m\u202e\\a.png")):
        assert escaped_name(path) == line, line
    monkeypatch.setattr(os, "sep", "/")
    assert escaped_name(r"models\x1b.png") == r"\models\\x1b.png"


def test_a_name_stdout_cannot_write_is_escaped_on_windows_too(monkeypatch):
    r"""On Windows (a backslash the separator) a path is printed as it is only where stdout writes every character of
    it: a name its code page lacks (写 in cp1252, a file or pipe) is escaped on a line starting with a backslash, or
    stdout's handler would write \u5199 in a line that reads as a name of those six characters. A stdout without an
    encoding (io.StringIO; pythonw has none) writes every character, as UTF-8 does."""
    import io

    from comfyui_diffsr.cli.common import escaped_name

    monkeypatch.setattr(os, "sep", "\\")
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="cp1252"))
    assert escaped_name("C:\\m\\caf\u00e9.png") == "C:\\m\\caf\u00e9.png"
    assert escaped_name("C:\\m\\\u5199.png") == r"\C:\\m\\\u5199.png"
    for stdout in (io.StringIO(), None):
        monkeypatch.setattr(sys, "stdout", stdout)
        assert escaped_name("C:\\m\\\u5199.png") == "C:\\m\\\u5199.png"


def test_a_strict_stdout_writes_each_byte_of_a_name_that_is_not_utf8(monkeypatch):
    """A name that is not UTF-8 holds bytes 0x80-0xFF, which Python decodes to U+DC80-U+DCFF: a strict stdout of a
    command writes each as its byte, the first and the last included; a lone surrogate below them (U+DC7F) is no
    byte of a name and is escaped. Bytes side by side (ÿé in Latin-1) are each written."""
    printed = printed_by_a_command(monkeypatch, "a\udc80b\udcff\udce9 \udc7f", "utf-8", "strict")
    assert printed == b"a\x80b\xff\xe9 \\udc7f\n"


def test_default_ignorable_table_is_unicodes():
    """``DEFAULT_IGNORABLE`` holds exactly the Default_Ignorable_Code_Point property (which Python's unicodedata
    lacks), as the ``regex`` module (a dependency of transformers) reads it from its own Unicode data."""
    from comfyui_diffsr.sr_common import names

    regex = pytest.importorskip("regex")
    property_ = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    table = {cp for first, last in names.DEFAULT_IGNORABLE for cp in range(first, last + 1)}
    assert table == {cp for cp in range(sys.maxunicode + 1) if property_.match(chr(cp))}


def test_a_folder_runs_read_errors_name_the_image_once(tmp_path, capsys):
    """Each failed image's line is ``error: <path>: <reason>``: the reason of an unreadable one named the path again
    (``error: a.png: Cannot read image 'a.png': ...``), and a file gone since the search a third time
    (Python's ``[Errno 2] No such file or directory: 'a.png'``)."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 3)
    (tmp_path / "in0.png").write_bytes(b"not an image")
    os.remove(pairs[1][0])
    assert common.upscale_all(pairs, lambda image, out: image, "test") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: /")]
    assert errors == [f"error: {pairs[0][0]}: Cannot read image: it is not an image, or in a format Pillow cannot "
                      "read. Export it as PNG or JPEG.",
                      f"error: {pairs[1][0]}: Cannot read image: No such file or directory"]


def test_a_folder_runs_summary_lists_failures_in_the_runs_order(tmp_path, monkeypatch, capsys):
    """An output its encoder refuses is known only once the next image is read: with that next image unreadable,
    the summary listed the later image first. It lists them in the order of the run."""
    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 4)
    (tmp_path / "in2.png").write_bytes(b"not an image")
    real_save = common.save_image

    def refuse_in1(image01, path, *profile):
        if path.endswith("in1.png"):
            raise ImageInputError(f"Cannot write {path!r}: encoder error. Try --format png.")
        real_save(image01, path, *profile)

    monkeypatch.setattr(common, "save_image", refuse_in1)
    assert common.upscale_all(pairs, lambda image, out: image, "test") == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: 2 of 4 image(s) failed: {pairs[1][0]}, {pairs[2][0]}"


def test_reading_a_large_image_leaves_the_warning_filters_as_they_were(tmp_path, monkeypatch, capsys):
    """The note on an image past Pillow's decompression-bomb warning hid Pillow's own warning with a filter that
    stayed set for the whole process: a program that imports the reader lost that warning for its own images. The
    filter holds for the read alone; the read still gives one note and no warning."""
    import warnings

    from comfyui_diffsr.cli import common

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 4×6: past the warning, below the refusal (40)
    pairs = _folder(tmp_path, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        filters = list(warnings.filters)
        common.load_image(pairs[0][0])
        assert warnings.filters == filters and not caught
        assert capsys.readouterr().err.count("note: ") == 1
        with Image.open(pairs[0][0]):  # another program's read: Pillow's warning
            pass
        assert [w.category for w in caught] == [Image.DecompressionBombWarning]


@pytest.mark.parametrize("meanwhile", ["simplefilter", "append", "reset"])
def test_warning_filters_another_thread_sets_during_a_read_stay_set(tmp_path, monkeypatch, meanwhile):
    """The read took its filter out by equality: where another thread set the same filter while an image was read
    (``simplefilter("ignore", DecompressionBombWarning)``, a common idiom; appended, it was not added at all), the
    read took that thread's out for good; where that thread reset the filters, the image failed ("Cannot read image:
    list.remove(x): x not in list"). The read takes out its own filter alone."""
    import threading
    import warnings

    from comfyui_diffsr.cli import common

    pairs = _folder(tmp_path, 1)
    program_filter = ("ignore", None, Image.DecompressionBombWarning, None, 0)
    set_filters = {"simplefilter": lambda: warnings.simplefilter("ignore", Image.DecompressionBombWarning),
                   "append": lambda: warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning,
                                                             append=True),
                   "reset": warnings.resetwarnings}[meanwhile]
    real_open = Image.open

    def open_while_another_thread_sets_filters(*args, **kwargs):
        other = threading.Thread(target=set_filters)
        other.start()
        other.join()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_while_another_thread_sets_filters)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        image = common.load_image(pairs[0][0])
        expected = [] if meanwhile == "reset" else [program_filter]
        assert [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning] == expected
    assert image.shape == (1, 3, 4, 6)


def test_prompt_cache_keeps_the_most_recently_used_prompts():
    from comfyui_diffsr.sr_common.sd21 import PromptCache

    cache = PromptCache(size=3)
    for prompt in "abcd":
        cache[prompt] = prompt.upper()
    assert list(cache) == ["b", "c", "d"] and "a" not in cache
    assert cache["b"] == "B"  # a use makes it the most recent
    cache["e"] = "E"
    assert list(cache.items()) == [("d", "D"), ("b", "B"), ("e", "E")]
    with pytest.raises(KeyError):
        cache["a"]


@pytest.mark.parametrize("shape", [(77, 1024), (1, 1, 77, 1024), (1, 77, 768)])
def test_a_prompt_embedding_not_of_shape_b_77_1024_is_refused_by_name(shape):
    """The UNet cross-attends to (B, 77, 1024): an embedding without its batch axis or with one too many is refused
    as one of another width is, naming its shape and the SD 2.1 text encoder."""
    from types import SimpleNamespace

    from comfyui_diffsr.sr_common.sd21 import checked_context

    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024))
    ok = torch.zeros(2, 77, 1024)
    assert checked_context(ok, unet) is ok
    with pytest.raises(ValueError, match=rf"has shape \({', '.join(map(str, shape))}\); the UNet needs "
                                         r"\(1, 77, 1024\).*CLIP of an SD 2.1 checkpoint"):
        checked_context(torch.zeros(shape), unet)


def test_auto_precision_skips_fp16_where_the_gpu_runs_it_badly(monkeypatch):
    """The commands' default precision on CUDA is fp16 (as the official code) on GPUs from compute capability 7 on,
    but float32 on older ones (fp16 no faster) and on the Turing cards without tensor cores, whose fp16 gives NaN;
    a precision asked for is kept."""
    from types import SimpleNamespace

    from comfyui_diffsr.sr_common.sd21 import network_dtype

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.version, "hip", None)
    for name, major, expected in (("NVIDIA H100 80GB HBM3", 9, torch.float16), ("NVIDIA GeForce RTX 3060", 8,
                                   torch.float16), ("Tesla V100-SXM2-16GB", 7, torch.float16),
                                  ("NVIDIA GeForce GTX 1660 SUPER", 7, torch.float32),
                                  ("NVIDIA T1000", 7, torch.float32), ("NVIDIA GeForce GTX 1080 Ti", 6, torch.float32),
                                  ("Tesla P100-PCIE-16GB", 6, torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _, n=name, m=major: SimpleNamespace(
            name=n, major=m))
        assert network_dtype(None, cuda) == network_dtype("auto", cuda) == expected, name
        assert network_dtype("fp16", cuda) == torch.float16
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: fp16, as ComfyUI
    assert network_dtype(None, cuda) == torch.float16
    assert network_dtype(None, torch.device("cpu")) == torch.float32


def test_ieee_float32_sets_and_puts_back_the_tf32_flags():
    from comfyui_diffsr.sr_common.sd21 import ieee_float32

    from conftest import IEEE_FLOAT32, tf32_flags

    before = tf32_flags()
    with ieee_float32():
        assert tf32_flags() in IEEE_FLOAT32
    assert tf32_flags() == before
    with pytest.raises(KeyError), ieee_float32():  # put back on an error too
        raise KeyError
    assert tf32_flags() == before


def test_alpha_is_upscaled_by_keys_bicubic_and_clamped():
    """The alpha of an RGBA input: cubic convolution (Keys, a = −0.75, half-pixel centres, edge pixels repeated),
    written out here as one matrix per axis, then clamped to [0, 1]; the RGB is kept as given."""
    from comfyui_diffsr.sr_common.image import with_upscaled_alpha

    def keys(x, a=-0.75):
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a

    def axis(n_in, n_out):
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = (i + 0.5) * n_in / n_out - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[i, min(max(base + k, 0), n_in - 1)] += keys(src - (base + k))
        return m

    alpha = torch.rand(1, 1, 4, 5, generator=torch.Generator().manual_seed(2))
    rgb = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(3))
    out = with_upscaled_alpha(rgb, alpha)
    expected = (axis(4, 12) @ alpha[0, 0].double() @ axis(5, 20).T).clamp(0, 1)
    assert torch.equal(out[:, :3], rgb)
    assert (out[0, 3].double() - expected).abs().max().item() < 1e-6
    spiky = torch.tensor([[[[0.0, 1.0, 0.0, 1.0]]]]).expand(1, 1, 4, 4)
    assert with_upscaled_alpha(torch.zeros(1, 3, 16, 16), spiky)[:, 3].max() == 1  # overshoot clamped


def test_overlap_is_kept_8_below_a_halved_tile():
    """After out-of-memory halves a latent tile, the overlap the user chose is cut to at most the tile less 8 (a
    tile of 16 with overlap 32 would have no stride); without tiling (0) it is 0, and a tile large enough keeps it."""
    assert tiling.overlap_within(16, 32) == 8
    assert tiling.overlap_within(24, 32) == 16
    assert tiling.overlap_within(8, 32) == 0
    assert tiling.overlap_within(0, 32) == 0
    assert tiling.overlap_within(96, 32) == 32
    assert tiling.overlap_within(40, 32) == 32


def test_a_warning_in_a_command_prints_as_one_note_line(capsys):
    """A warning raised while a command runs (the fp16 VAE's overflow, a library's) is a ``note:`` line as the
    commands' others, without Python's ``file:line: UserWarning:`` header and source line; the way warnings are shown
    is the caller's again once the command returns."""
    import warnings

    from comfyui_diffsr.cli.common import run_main

    shown_before = warnings.showwarning

    def command(argv):
        warnings.warn("The fp16 VAE decoder overflowed on this input;\n  running it again in float32", RuntimeWarning)
        return 0

    assert run_main(command, []) == 0
    assert capsys.readouterr().err == ("note: The fp16 VAE decoder overflowed on this input; running it again in "
                                       "float32\n")
    assert warnings.showwarning is shown_before


def test_a_command_says_a_repeated_image_warning_once_per_image_and_not_torchs_typed_storage_note(capsys):
    """Python shows a warning once per source line: Pillow's note on a damaged EXIF came for the first of a folder's
    images with that damage alone; each image gives it, once. torch 2.1's weights-only loader warns that
    "TypedStorage is deprecated" (its own use, nothing the user can change): no note. A -W filter still comes first."""
    import warnings

    from comfyui_diffsr.cli import common

    pillow = {"__name__": "PIL.TiffImagePlugin", "warnings": warnings}  # a module of Pillow, as seen by warnings
    warns_twice = compile("for _ in range(2): warnings.warn('Truncated File Read')", "TiffImagePlugin.py", "exec")

    def command(argv):
        for name in ("a.jpg", "b.jpg"):
            common._reading.path, common._reading.noted = name, set()
            exec(warns_twice, pillow)
            common._reading.path = None
        warnings.warn("TypedStorage is deprecated. It will be removed in the future and UntypedStorage will be the "
                      "only storage class.", UserWarning)
        return 0

    with warnings.catch_warnings():
        warnings.resetwarnings()  # Python's own filters, not pytest's (which ignore TypedStorage's)
        warnings.simplefilter("ignore", DeprecationWarning)
        assert common.run_main(command, []) == 0
        assert capsys.readouterr().err == "note: a.jpg: Truncated File Read\nnote: b.jpg: Truncated File Read\n"
        warnings.simplefilter("error", UserWarning)  # as -W error::UserWarning
        with pytest.raises(UserWarning, match="Truncated File Read"):
            common.run_main(command, [])


def test_a_command_keeps_the_stdout_errors_asked_for(monkeypatch):
    """The commands let a strict stdout write a name that is not UTF-8 as its bytes (surrogateescape), but they also
    replaced an errors handler the user had asked for (PYTHONIOENCODING=cp1252:replace, ascii:backslashreplace, for
    a Windows pipe): ``diffsr convert``'s 'wrote' line, ``diffsr download``'s paths then ended in a
    UnicodeEncodeError on a name such as café or 日本, after the work was done. Only a strict stdout is changed: it
    writes the bytes of a name that is not UTF-8 as they are, and escapes what its encoding lacks (日本 in Windows'
    cp1252, which ended the commands as that error did)."""
    line = "caf\u00e9 \u65e5\u672c x\udce9"
    assert printed_by_a_command(monkeypatch, line, "ascii", "backslashreplace") == b"caf\\xe9 \\u65e5\\u672c x\\udce9\n"
    assert printed_by_a_command(monkeypatch, line, "utf-8", "strict") == "caf\u00e9 \u65e5\u672c x".encode() + b"\xe9\n"
    # a Windows file or pipe
    assert printed_by_a_command(monkeypatch, line, "cp1252", "strict") == b"caf\xe9 \\u65e5\\u672c x\xe9\n"
    # no byte of its own: escaped
    assert (printed_by_a_command(monkeypatch, line, "utf-16-le", "strict")
            == "caf\u00e9 \u65e5\u672c x\\udce9\n".encode("utf-16-le"))


def printed_by_a_command(monkeypatch, line, encoding, errors):
    """The bytes a command run by ``run_main`` that prints ``line`` writes to a stdout of ``encoding`` and
    ``errors``."""
    import io

    from comfyui_diffsr.cli.common import run_main

    def command(argv):
        print(line)
        return 0

    stdout = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert run_main(command, []) == 0
    stdout.flush()
    return stdout.buffer.getvalue()
