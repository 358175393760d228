"""Bad images through the library, the commands and the OSEDiff node (tiny models): each gives a correct
output (right size, finite, in [0, 1]) or a clear ``ImageInputError``; nothing crashes. A run that fails half
way holds none of its tensors."""

import copy
import io
import os
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import comfyui_diffsr
from comfyui_diffsr.cli.common import OUTPUT_FOLDER_MARK, load_image
from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.dossr_core.pipeline import Options as DoSSROptions
from comfyui_diffsr.dossr_core.pipeline import dossr_upscale
from comfyui_diffsr.dossr_core.sampling import sample_dossr
from comfyui_diffsr.osediff_core.pipeline import Options, build_osediff, osediff_upscale
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common import image as img
from comfyui_diffsr.sr_common.errors import ImageInputError, OptionError
from comfyui_diffsr.sr_common.sd21 import load_sd21

from conftest import (DATA, DOSSR, DOSSR_CONFIG, OSEDIFF, copy_tiny_sd21, host_stand_ins, tensors_a_failure_keeps,
                      tensors_failures_in_closures_keep)
from workflow_schema import import_pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return copy_tiny_sd21(tmp_path_factory.mktemp("base") / "tiny_sd21")


@pytest.fixture(scope="module")
def osediff_model(tiny_folder):
    return build_osediff(load_sd21(tiny_folder), read_osediff(OSEDIFF))


@pytest.fixture(scope="module")
def dossr_model():
    """The tiny DoSSR model. The smallest input (padded to one 64 px block) gives a 1×1 map at the networks' deepest
    level, which has 128 channels in 32 GroupNorm groups (model_channels 64, channel_mult [1,1,2,2]), so it can be
    normalised (SD 2.1 has 10 channels per group); with the former channel_mult [1,1,1,1] at 32 channels, one channel
    per group, this fixture had to halve the groups."""
    return load_dossr(DOSSR, config=DOSSR_CONFIG)


def assert_good(out, size):
    """(1, 3, H, W) of ``size`` = (H, W), finite, in [0, 1]."""
    assert tuple(out.shape) == (1, 3) + size
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


def _nan(image):
    image[..., 0, 0] = float("nan")
    return image


def _inf(sign):
    def make(image):
        image[..., -1, -1] = sign * float("inf")
        return image
    return make


# id: (B, C, H, W), a change applied to the random image, expected: output (H, W) or an error message
LIBRARY_CASES = {
    "1x1": ((1, 3, 1, 1), None, (4, 4)),
    "7x13": ((1, 3, 13, 7), None, (52, 28)),
    "16-bit values": ((1, 3, 13, 7), lambda x: (x * 65535).round() / 65535, (52, 28)),
    "out of range": ((1, 3, 13, 7), lambda x: x * 2 - 0.5, (52, 28)),
    "RGBA": ((1, 4, 13, 7), None, "3 colour channels.*RGBA"),
    "grayscale": ((1, 1, 13, 7), None, "3 colour channels.*grayscale"),
    "NaN": ((1, 3, 13, 7), _nan, "NaN or Inf"),
    "+Inf": ((1, 3, 13, 7), _inf(1), "NaN or Inf"),
    "-Inf": ((1, 3, 13, 7), _inf(-1), "NaN or Inf"),
    "no pixels": ((1, 3, 0, 7), None, "no pixels"),
    "not a batch": ((3, 13, 7), None, r"\(B, C, H, W\)"),
}


def _image(shape, change, seed=0):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return change(image) if change else image


def _check(run, case):
    shape, change, expected = LIBRARY_CASES[case]
    image = _image(shape, change)
    if isinstance(expected, str):
        with pytest.raises(ImageInputError, match=expected):
            run(image)
    else:
        assert_good(run(image), expected)


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_osediff_library(osediff_model, case):
    _check(lambda x: osediff_upscale(osediff_model, x, options=Options(process_size=64)), case)


@pytest.mark.parametrize("case", [c for c in LIBRARY_CASES if c not in ("16-bit values", "out of range")])
def test_dossr_library(dossr_model, case):
    embeds = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    _check(lambda x: dossr_upscale(dossr_model, x, prompt_embeds=embeds, options=DoSSROptions(steps=1)), case)


def test_very_thin_images(osediff_model, dossr_model):
    """2×2000 (OSEDiff, no short-side enlargement) and 2×100 (DoSSR, whose ×4 result is padded to 64 px wide)."""
    thin = torch.rand(1, 3, 2000, 2, generator=torch.Generator().manual_seed(2))
    assert_good(osediff_upscale(osediff_model, thin, options=Options(process_size=0)), (8000, 8))
    embeds = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    out = dossr_upscale(dossr_model, thin[..., :100, :], prompt_embeds=embeds, options=DoSSROptions(steps=1))
    assert_good(out, (400, 8))


def test_thin_image_with_default_process_size_is_bounded(osediff_model, monkeypatch):
    """Raising the short side of a 2×2000 image to process_size/upscale would ask for 512×512000 px: the
    enlargement is capped (exact sizing) or the image refused (official sizing)."""
    resize = img.resize

    def guarded(image, size, method="bicubic"):
        assert size[0] * size[1] <= 4096 * 4096, f"asked for a {size[0]}×{size[1]} px resize"
        return resize(image, size, method)

    monkeypatch.setattr(img, "resize", guarded)
    thin = torch.rand(1, 3, 2000, 2, generator=torch.Generator().manual_seed(2))
    assert_good(osediff_upscale(osediff_model, thin, options=Options(process_size=512)), (8000, 8))
    with pytest.raises(ImageInputError, match="too thin for --official-sizing"):
        osediff_upscale(osediff_model, thin, options=Options(process_size=512, official_sizing=True))


@pytest.mark.parametrize("size", [4097, 10 ** 9, -1])
def test_the_api_refuses_a_process_size_past_the_nodes_largest(osediff_model, size):
    """``Options.process_size`` had no bound, where the nodes and commands stop at 4096 (``MAX_PROCESS_SIZE``):
    10⁵ enlarged a 32-px image to 25000 px a side, 10⁹ ended in a MemoryError without a message. The API refuses it
    as the commands do, a ValueError that names the range, before any work; 4096 is taken."""
    from comfyui_diffsr.osediff_core.pipeline import MAX_PROCESS_SIZE, enlarge_small

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=rf"^`process_size` must be between 0 and 4096, got {size}$"):
        osediff_upscale(osediff_model, image, options=Options(process_size=size))
    large = torch.zeros(1, 3, 1024, 1024)  # a short side of 4096 / 4: as it is
    assert enlarge_small(large, process_size=MAX_PROCESS_SIZE) is large


@pytest.mark.parametrize("upscale", [0, 0.5, 9, 100, float("nan")])
def test_the_api_refuses_an_upscale_the_nodes_and_commands_do_not_take(osediff_model, dossr_model, upscale):
    """``Options.upscale`` had no bound in OSEDiff's API, where the nodes and commands take 1 to 8: 100 ran the
    networks at 100× the input's sides, 0 ended in a ZeroDivisionError and NaN in PIL's ValueError; DoSSR's API
    took (0, 16], its nodes 1 to 8. Both refuse it as the commands do (one check, ``check_upscale``), a ValueError
    naming the range, before any work; 1 and 8 are taken. A fractional upscale with official sizing, whose sizes are
    ×int(upscale), ran at ×2 for 2.5 without a word; it is refused as the commands refuse it."""
    from comfyui_diffsr.osediff_core.pipeline import preprocess

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    refusal = rf"^`upscale` must be between 1 and 8, got {upscale:g}$"
    with pytest.raises(ValueError, match=refusal):
        osediff_upscale(osediff_model, image, options=Options(upscale=upscale, process_size=0))
    embeds = torch.zeros(1, 77, dossr_model.unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match=refusal):
        dossr_upscale(dossr_model, image, prompt_embeds=embeds, options=DoSSROptions(steps=1, upscale=upscale))
    for taken in (1, 8):
        assert tuple(preprocess(image, upscale=taken, process_size=0)[0].shape) == (1, 3, 16 * taken, 16 * taken)
    with pytest.raises(ValueError, match=r"^`official_sizing` takes an integer `upscale` \(the official code does\), "
                                         r"got 2.5$"):
        preprocess(image, upscale=2.5, process_size=0, official_sizing=True)


WRONG_TYPES = [  # (method, Options field, value, the refusal)
    ("osediff", "upscale", "4", "`upscale` takes a number from 1 to 8, got str '4'"),
    ("osediff", "upscale", True, "`upscale` takes a number from 1 to 8, got bool True"),
    ("osediff", "process_size", 512.0, "`process_size` takes an integer from 0 to 4096, got float 512.0"),
    ("osediff", "official_sizing", "no", "`official_sizing` takes True or False, got str 'no'"),
    ("osediff", "seed", "1", "`seed` takes an integer, got str '1'"),
    ("osediff", "seed", 1.5, "`seed` takes an integer, got float 1.5"),
    ("osediff", "tile_latent", "96", "`tile_latent` takes an integer, got str '96'"),
    ("osediff", "vae_tile_decode", None, "`vae_tile_decode` takes an integer, got NoneType None"),
    ("osediff", "tile_batch", 1.0, "`tile_batch` takes an integer, got float 1.0"),
    ("dossr", "steps", 1.0, "`steps` takes an integer, got float 1.0"),
    ("dossr", "upscale", "4", "`upscale` takes a number from 1 to 8, got str '4'"),
    ("dossr", "seed", "1", "`seed` takes an integer, got str '1'"),
    ("dossr", "order", "3", "`order` takes an integer, got str '3'"),
    ("dossr", "gamma", True, "`gamma` takes a number, got bool True"),
    ("dossr", "tile_overlap", "32", "`tile_overlap` takes an integer, got str '32'"),
    ("dossr", "vae_tile_encode", "1024", "`vae_tile_encode` takes an integer, got str '1024'")]


@pytest.mark.parametrize("method, field, value, refusal", WRONG_TYPES,
                         ids=[f"{method} {field}={value!r}" for method, field, value, _ in WRONG_TYPES])
def test_the_api_refuses_an_option_of_the_wrong_type_by_name(osediff_model, dossr_model, method, field, value,
                                                              refusal):
    """``Options(upscale="4")`` ended in a bare TypeError from a comparison deep inside ('<=' not supported between
    'int' and 'str'), ``order="3"`` in "`order` must be 1, 2 or 3, got 3", ``steps=1.0`` in a TypeError naming
    `num_steps`; ``upscale=True`` ran at ×1, ``seed=1.5`` as seed 1, ``official_sizing="no"`` with the official
    sizing, ``process_size=512.0`` and ``seed="1"`` as if right. Each number of either method's ``Options`` is
    checked for its type before any work: an ``OptionError`` (a ValueError) naming the field, the type given and
    what it takes; a bool is no number."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    stages = []
    with pytest.raises(OptionError) as refused:
        if method == "osediff":
            osediff_upscale(osediff_model, image, options=Options(**{"process_size": 0, field: value}),
                            callback=lambda *stage: stages.append(stage))
        else:
            embeds = torch.zeros(1, 77, dossr_model.unet.config.cross_attention_dim)
            dossr_upscale(dossr_model, image, prompt_embeds=embeds, options=DoSSROptions(**{"steps": 1, field: value}),
                          callback=lambda *stage: stages.append(stage))
    assert str(refused.value) == refusal and stages == []


def test_the_api_takes_numpy_values_for_its_options():
    """numpy's numbers are taken for the number fields, but numpy's bools (``official_sizing=scales.max() > 1``) were
    refused for ``official_sizing`` with "takes True or False, got bool np.True_"."""
    from comfyui_diffsr.osediff_core.pipeline import check_options

    for official in (np.True_, np.False_, np.array(2) > 1):
        check_options(Options(upscale=np.float32(2), process_size=np.int64(512), official_sizing=official))
    with pytest.raises(OptionError, match=r"^`official_sizing` takes True or False, got int64 "):
        check_options(Options(official_sizing=np.int64(1)))


def test_thin_image_enlargement_is_capped_at_four_times_the_short_side_target():
    """2×100 at the default process size 512, ×4: raising the short side to 512/4 = 128 px would make it 6400 px
    long; the enlargement stops where the long side reaches 4 · 128 = 512 px (×5.12: 512×10, truncated as PIL
    sizes), so the networks see 2048×40 px, and the output is still 400×8."""
    from comfyui_diffsr.osediff_core.pipeline import preprocess

    thin = torch.rand(1, 3, 2, 100, generator=torch.Generator().manual_seed(3))
    lq, plan = preprocess(thin, upscale=4, process_size=512)
    assert tuple(lq.shape) == (1, 3, 40, 2048)
    assert plan.crop == (40, 2048) and plan.output_size == (400, 8)
    lq, _ = preprocess(thin.transpose(-1, -2), upscale=2, process_size=128)  # 64 px short side: 256 px long at most
    assert tuple(lq.shape) == (1, 3, 2 * 256, 2 * 5)


@pytest.mark.parametrize("size", [(1, 100), (100, 1)], ids=["1 px high", "1 px wide"])
def test_official_sizing_refuses_an_image_with_one_side_under_8_px(size):
    """--official-sizing crops the ×upscale LQ to a multiple of 8: a 1 px side at ×4 (4 px) leaves nothing of it,
    which is refused by name whichever side it is, even where the other side is long."""
    from comfyui_diffsr.osediff_core.pipeline import preprocess

    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ImageInputError, match="too small for --official-sizing"):
        preprocess(image, upscale=4, process_size=0, official_sizing=True)
    lq, plan = preprocess(torch.rand(1, 3, 2, 100), upscale=4, process_size=0, official_sizing=True)
    assert tuple(lq.shape) == (1, 3, 8, 400) and plan.output_size == (400, 8)  # 2 px at ×4: one row of 8


def test_large_image_is_tiled(osediff_model):
    """A large image (simulated with small tile sizes): latent, VAE encoder and decoder tiles are used."""
    calls = {}

    def callback(stage, done, total):
        calls[stage] = max(total, calls.get(stage, 0))

    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    options = Options(process_size=0, tile_latent=16, tile_overlap=8, vae_tile_encode=96, vae_tile_decode=8)
    out = osediff_upscale(osediff_model, image, options=options, callback=callback)
    assert_good(out, (192, 256))
    assert calls["unet"] == 6, calls  # latent 24×32 in 16-tiles with overlap 8: 2 × 3
    assert "encode" in calls and "decode" in calls, calls  # reported only when the VAE runs tiled


def api_run(pipeline, model, tiled, callback, steps=2):
    """A call of the Python API on a 24×32 image at ×4, with latent tiles and VAE encoder tiles (bounded mode) when
    ``tiled``; DoSSR (``steps``) keeps its trace (every step's state), as ``--save-noise`` does."""
    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(4))
    tiles = dict(tile_latent=8, tile_overlap=4, vae_tile_encode=32) if tiled else {}
    if pipeline == "osediff":
        options = Options(process_size=0, **tiles)
        return lambda: osediff_upscale(model, image, options=options, callback=callback)
    options = DoSSROptions(steps=steps, **tiles)
    embeds = torch.zeros(1, 77, model.unet.config.cross_attention_dim)
    return lambda: dossr_upscale(model, image, prompt_embeds=embeds, options=options, callback=callback, trace={})


def tensors_a_failed_call_keeps(model, pipeline, tiled, failure, within=None):
    """``tensors_a_failure_keeps`` of ``api_run``: out of memory, Ctrl-C through the callback (the next call of it
    once half way), an unexpected error."""
    interrupted = []

    def fail():
        if failure == "out-of-memory":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if failure == "a-bug":
            raise KeyError("a bug")
        interrupted.append(True)

    def callback(*_):
        if interrupted:
            raise KeyboardInterrupt

    raised = {"out-of-memory": torch.cuda.OutOfMemoryError, "interrupt": KeyboardInterrupt, "a-bug": KeyError}
    return tensors_a_failure_keeps(api_run(pipeline, model, tiled, callback), fail, raised[failure], within)


# untiled, OSEDiff calls no callback: no Ctrl-C through it
@pytest.mark.parametrize("pipeline, tiled, failure", [
    (pipeline, tiled, failure) for pipeline in ("osediff", "dossr") for tiled in ("untiled", "tiled")
    for failure in ("out-of-memory", "interrupt", "a-bug") if (pipeline, tiled, failure) != ("osediff", "untiled",
                                                                                             "interrupt")])
def test_an_api_call_failing_midway_holds_none_of_the_tensors_it_made(osediff_model, dossr_model, pipeline, tiled,
                                                                      failure):
    """A call of ``osediff_upscale`` or ``dossr_upscale`` that fails half way (out of memory, Ctrl-C through its
    callback, an unexpected error): the error, which a notebook keeps (``sys.last_exc``), held in its frames every
    tensor the run had made, so the user's retry ran out of memory again. None of them outlives the failure."""
    model = osediff_model if pipeline == "osediff" else dossr_model
    alive, error = tensors_a_failed_call_keeps(model, pipeline, tiled == "tiled", failure)
    assert alive == [], error


@pytest.mark.parametrize("pipeline", ["osediff", "dossr"])
def test_a_failure_inside_a_closure_of_the_run_holds_none_of_its_tensors(osediff_model, dossr_model, pipeline):
    """Out of memory inside each closure of the pack that a tiled call runs (``RunningClosures``: the tiled VAE's
    passes and statistics, DoSSR's noise draw, a generator), or Ctrl-C through the callback once DoSSR samples (its
    step callback kept every state for ``trace``): a failed run's frames are cleared, but a frame keeps its
    function, and a closure what it captured (the VAE's input and statistics, the draws, the states, the image)."""
    model = osediff_model if pipeline == "osediff" else dossr_model

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    kept = tensors_failures_in_closures_keep(api_run(pipeline, model, True, None, steps=1), out_of_memory,
                                             torch.cuda.OutOfMemoryError, os.path.dirname(comfyui_diffsr.__file__))
    if pipeline == "dossr":
        kept["the step callback"] = tensors_a_failed_call_keeps(model, pipeline, False, "interrupt",
                                                                sample_dossr.__code__)[0]
    assert kept == dict.fromkeys(kept, [])


# ------------------------------------------------------------------------------------------ files
def _png(path, width, height, depth, colour, rows, transparent=None):
    """A PNG written byte by byte (PIL cannot write 16-bit RGB, nor, in Pillow 10, a 16-bit gray one with a
    transparent value); ``transparent``: the gray value its tRNS chunk makes transparent."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    trns = chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + trns + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _gradient16(height, width):
    return (np.arange(height * width).reshape(height, width) * 997 % 65536).astype(np.uint16)


def test_16bit_grayscale_keeps_its_values(tmp_path):
    values = _gradient16(13, 7)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = load_image(str(tmp_path / "g16.png"))
    assert loaded.shape == (1, 3, 13, 7)
    torch.testing.assert_close(loaded[0, 1], torch.from_numpy(values / 65535.0).float())


def test_16bit_grayscale_with_a_transparent_value_keeps_its_alpha(tmp_path):
    """A 16-bit grayscale PNG whose tRNS chunk makes one value transparent: that value's pixels have alpha 0, the
    others 1, as for an 8-bit one (the alpha was dropped); without that value in the image there is no alpha."""
    from comfyui_diffsr.cli.common import read_image

    values = _gradient16(13, 7)
    rows = [row.astype(">u2").tobytes() for row in values]
    _png(tmp_path / "g16.png", 7, 13, 16, 0, rows, transparent=int(values[2, 3]))
    image, _, alpha = read_image(str(tmp_path / "g16.png"))
    torch.testing.assert_close(image[0, 1], torch.from_numpy(values / 65535.0).float())
    assert torch.equal(alpha[0, 0], torch.from_numpy(values != values[2, 3]).float())
    _png(tmp_path / "g16_none.png", 7, 13, 16, 0, rows, transparent=65535)
    assert read_image(str(tmp_path / "g16_none.png"))[2] is None


def test_16bit_rgb_png_is_read(tmp_path):
    values = np.stack([_gradient16(13, 7), _gradient16(13, 7)[::-1], np.full((13, 7), 40000, np.uint16)], -1)
    _png(tmp_path / "rgb16.png", 7, 13, 16, 2, [row.astype(">u2").tobytes() for row in values])
    loaded = load_image(str(tmp_path / "rgb16.png"))
    assert loaded.shape == (1, 3, 13, 7)
    assert (loaded * 255 - torch.from_numpy((values >> 8).astype(np.int32)).permute(2, 0, 1).float()).abs().max() <= 1


def test_an_animation_gives_its_first_frame_with_a_note(tmp_path, capsys):
    frames = [Image.new("RGB", (9, 5), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    loaded = load_image(str(tmp_path / "anim.webp"))
    assert loaded.shape == (1, 3, 5, 9) and torch.equal(loaded[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert "3 frames (an animation or a multi-page file); only the first is read" in capsys.readouterr().err
    frames[0].save(tmp_path / "still.png")
    load_image(str(tmp_path / "still.png"))
    assert capsys.readouterr().err == ""


def test_an_image_past_pillows_decompression_bomb_warning_is_read_with_a_one_line_note(tmp_path, capsys,
                                                                                         monkeypatch, recwarn):
    """Pillow warns from 89 megapixels (and refuses from twice that): its warning, with its ``warnings.warn(``
    source line, is one note naming the file instead, and the image is read."""
    with Image.open(os.path.join(DATA, "osediff", "in_32x32.png")) as original:
        expected = img.pil_to_tensor(original)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 32×32: past the warning, below the refusal (1200)
    path = tmp_path / "big\x1bphoto.png"
    shutil.copy(os.path.join(DATA, "osediff", "in_32x32.png"), path)
    assert torch.equal(load_image(str(path)), expected)
    assert capsys.readouterr().err == (f"note: {tmp_path}/big\\x1bphoto.png: 32×32 px, more than the 600 pixels "
                                       "Pillow opens without a decompression-bomb warning; it is read as given\n")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def _jpeg_with_a_tag_past_its_exif(path):
    """A JPEG whose EXIF holds an ImageDescription (tag 270) whose data would lie past the EXIF's end: Pillow skips the
    tag with a warning ("Tag data larger than file. Skipping tag 270"; Pillow 10: "Truncated File Read") and reads the
    image."""
    ifd = (struct.pack("<2sHIH", b"II", 42, 8, 2) + struct.pack("<HHII", 0x0112, 3, 1, 1)
           + struct.pack("<HHII", 0x010E, 2, 100, 4000) + struct.pack("<I", 0))
    Image.new("RGB", (32, 32), (120, 60, 30)).save(path, "JPEG", exif=b"Exif\0\0" + ifd)


def test_a_warning_given_while_an_image_is_read_names_the_image(tiny_folder, tmp_path, capsys):
    """Pillow's warning on a damaged EXIF was a note that did not say which image it was about ("note: Tag data
    larger than file. Skipping tag 270"), in a folder run of hundreds; and, Python showing a warning once per source
    line, a second image with the same damage gave none. Each such image is named, and upscaled."""
    from comfyui_diffsr.cli.osediff import main

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(os.path.join(DATA, "osediff", "in_32x32.png"), images / "a.png")
    _jpeg_with_a_tag_past_its_exif(images / "photo.jpg")
    _jpeg_with_a_tag_past_its_exif(images / "scan.jpg")
    assert main([str(images), "-o", str(tmp_path / "out"), "--base", tiny_folder, "--weights", OSEDIFF,
                 "--process-size", "64", "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert [note.split(": ")[1] for note in notes] == [str(images / "photo.jpg"), str(images / "scan.jpg")], notes
    assert all("Skipping tag 270" in note or "Truncated File Read" in note for note in notes), notes
    assert sorted(os.listdir(tmp_path / "out")) == sorted([OUTPUT_FOLDER_MARK, "a.png", "photo.png", "scan.png"])


@pytest.mark.parametrize("content, message", [
    (lambda: b"not an image", "^Cannot read image: it is not an image, or in a format Pillow cannot read. Export it "
                              "as PNG or JPEG.$"),
    (lambda: open(os.path.join(DATA, "osediff", "in_32x32.png"), "rb").read()[:300],
     "^Cannot read image: image file is truncated.* Copy it again.$"),
    (lambda: b"", r"^Cannot read image: the file is empty \(0 bytes\): its copy or download did not finish. Copy it "
                  "again.$"),
    (lambda: b"\n <!DOCTYPE html><html><body>Sign in</body></html>",
     r"^Cannot read image: it is an HTML page \(a failed download or a login page\), not an image. Download it "
     "again.$"),
    (None, "too large"),
])
def test_unreadable_image_files(tmp_path, content, message):
    """Each unreadable file is refused with what it is and the fix that applies: an empty file, a cut one or an HTML
    page saved under an image's name is copied or downloaded again, not exported as PNG or JPEG."""
    path = tmp_path / "bad.png"
    if content is None:  # a 30000×30000 header with almost no data: PIL's decompression-bomb guard
        _png(path, 30000, 30000, 8, 2, [b"\x00" * 3])
    else:
        path.write_bytes(content())
    with pytest.raises(ImageInputError, match=message) as raised:
        load_image(str(path))
    assert "bad.png" not in str(raised.value)  # the caller's line names it: error: <path>: <message>


def _frames_file(kind, count):
    """``count`` frames of random pixels saved as one ``kind`` file (a multi-page TIFF, an animated GIF): its bytes.
    Each frame is shown for 0.1 s (a GIF: a control block before each frame)."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(count)]
    data = io.BytesIO()
    frames[0].save(data, format=kind, save_all=True, append_images=frames[1:], duration=100)
    return data.getvalue()


def _cut(kind, count, fraction):
    data = _frames_file(kind, count)
    return data[:int(len(data) * fraction)]


def _gif_cut_in_its_last_frames_header():
    data = _frames_file("GIF", 3)
    return data[:data.rindex(b"\x21\xf9\x04") + 8 + 5]  # the frame's 8-byte control block, 5 of its descriptor's 10


def _tiff_whose_second_page_has_an_unknown_compression():
    data = bytearray(_frames_file("TIFF", 2))
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for entry in range(second + 2, second + 2 + 12 * struct.unpack_from("<H", data, second)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 259:  # Compression
            struct.pack_into("<H", data, entry + 8, 11265)
    return bytes(data)


# file suffix, content: PIL raises TypeError, IndexError, KeyError and struct.error on them as it counts the frames
DAMAGED_FRAMES = {
    "2-page TIFF cut in half": ("tif", lambda: _cut("TIFF", 2, 0.5)),
    "3-frame GIF cut at 35 %": ("gif", lambda: _cut("GIF", 3, 0.35)),
    "TIFF page of an unknown compression": ("tif", _tiff_whose_second_page_has_an_unknown_compression),
    "GIF cut in a frame's header": ("gif", _gif_cut_in_its_last_frames_header),
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's, on the TIFF cut in half
@pytest.mark.parametrize("case", DAMAGED_FRAMES)
def test_damaged_multi_frame_files_are_unreadable_images(tmp_path, case):
    """Whatever PIL raises on a damaged file becomes the pack's image error, which a folder run reports and passes."""
    suffix, content = DAMAGED_FRAMES[case]
    path = tmp_path / f"bad.{suffix}"
    path.write_bytes(content())
    with pytest.raises(ImageInputError, match="Cannot read image: "):
        load_image(str(path))


def test_damaged_multi_frame_files_fail_alone_in_a_folder_run(tiny_folder, tmp_path, capsys):
    """A cut multi-page TIFF in a folder and a cut animated GIF given by name fail on their own: each is named on
    one line, the images after them are written, and the command exits with status 2."""
    from comfyui_diffsr.cli.osediff import main

    images = tmp_path / "in"
    images.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(os.path.join(DATA, "osediff", "in_32x32.png"), images / name)
    (images / "b_pages.tif").write_bytes(DAMAGED_FRAMES["2-page TIFF cut in half"][1]())
    gif = tmp_path / "frames.gif"
    gif.write_bytes(DAMAGED_FRAMES["3-frame GIF cut at 35 %"][1]())
    assert main([str(images), str(gif), "-o", str(tmp_path / "out"), "--base", tiny_folder, "--weights", OSEDIFF,
                 "--process-size", "64", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "b_pages.tif: Cannot read image" in err and "frames.gif: Cannot read image" in err, err
    assert "2 of 4 image(s) failed" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "a.png", "c.png"]


def test_osediff_command_on_odd_files(tiny_folder, tmp_path, capsys):
    from comfyui_diffsr.cli.osediff import main

    images = tmp_path / "in"
    images.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (13, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb[:1, :1]).save(images / "one.png")
    Image.fromarray(rgb).save(images / "rgb7x13.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(images / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(images / "gray.png")
    Image.fromarray(_gradient16(13, 7)).save(images / "gray16.png")
    Image.fromarray(rgb).convert("P").save(images / "palette.png")
    args = [str(images), "-o", str(tmp_path / "out"), "--base", tiny_folder, "--weights", OSEDIFF,
            "--process-size", "64", "--device", "cpu"]
    assert main(args) == 0
    for name in ("rgb7x13", "rgba", "gray", "gray16", "palette"):
        out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert out.shape == (52, 28, 4 if name == "rgba" else 3), name  # the transparent one keeps its alpha
    assert np.asarray(Image.open(tmp_path / "out" / "one.png")).shape == (4, 4, 3)
    _png(images / "zbomb.png", 30000, 30000, 8, 2, [b"\x00" * 3])
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "zbomb.png" in err and "too large" in err, err


# ------------------------------------------------------------------------------------------ the node
@pytest.fixture(scope="module")
def pack(tmp_path_factory, tiny_folder):
    """The pack imported as ComfyUI does, against the host stand-ins, with the tiny models in its folders."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_folder, models / "diffusers" / "tiny_sd21")
    (models / "osediff").mkdir()
    shutil.copy(OSEDIFF, models / "osediff")
    name = "custom_nodes_x_diffsr_bad_inputs"
    with host_stand_ins(name, models):
        nodes = {n.define_schema().node_id: n for n in import_pack(ROOT, name)}
        (sd21,) = nodes["DiffSR_SD21Loader"].execute(base="diffusers/tiny_sd21").args
        (model,) = nodes["OSEDiff_Loader"].execute(sd21=sd21, weights="osediff_tiny.pkl").args
        yield nodes, model, sys.modules[f"{name}.sr_common.errors"].ImageInputError


def upscale_node(pack, image, **changes):
    nodes, model, _ = pack
    inputs = dict(model=model, image=image, prompt="", upscale=4.0, process_size=64, color_fix="adain", tile_latent=96,
                  tile_overlap=32, dtype="fp32")
    inputs.update(changes)
    return nodes["OSEDiff_Upscale"].execute(**inputs).args[0]


def test_node_batch_of_one_hundred(pack):
    images = torch.rand(100, 8, 8, 3, generator=torch.Generator().manual_seed(4))
    out = upscale_node(pack, images)
    assert out.shape == (100, 32, 32, 3)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_node_refuses_nan(pack):
    image = torch.rand(1, 8, 8, 3)
    image[0, 3, 3, 1] = float("nan")
    with pytest.raises(pack[2], match="NaN or Inf"):  # the pack's own class: it is imported under the host's name
        upscale_node(pack, image)


def test_node_out_of_memory_retries_with_smaller_tiles(pack, monkeypatch, capsys):
    """The UNet 'runs out of memory' on latents wider than 16: the node halves its tile and says so."""
    _, model, _ = pack
    oom = sys.modules["comfy.model_management"].OOM_EXCEPTION
    forward = model.unet.forward
    sizes = []

    def limited(sample, *args, **kwargs):
        sizes.append(tuple(sample.shape[-2:]))
        if max(sample.shape[-2:]) > 16:
            raise oom("CUDA out of memory (simulated)")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", limited)
    image = torch.rand(1, 48, 48, 3, generator=torch.Generator().manual_seed(5))
    out = upscale_node(pack, image, tile_latent=32, tile_overlap=16)
    assert out.shape == (1, 192, 192, 3) and torch.isfinite(out).all()
    assert sizes[0] == (24, 24) and all(max(s) <= 16 for s in sizes[1:]) and len(sizes) > 2, sizes
    printed = capsys.readouterr().out
    assert "out of memory" in printed and "16" in printed, printed


def test_node_keeps_alpha_and_grayscale_sizes(pack):
    rgba = upscale_node(pack, torch.rand(2, 7, 13, 4, generator=torch.Generator().manual_seed(6)))
    gray = upscale_node(pack, torch.rand(1, 7, 13, 1, generator=torch.Generator().manual_seed(7)))
    assert rgba.shape == (2, 28, 52, 4) and gray.shape == (1, 28, 52, 3)
    assert rgba.min() >= 0 and rgba.max() <= 1 and torch.isfinite(gray).all()


def test_dossr_batch_is_refused_clearly(dossr_model):
    embeds = torch.randn(1, 77, 16)
    with pytest.raises(ValueError, match="single image"):
        dossr_upscale(copy.copy(dossr_model), torch.rand(2, 3, 8, 8), prompt_embeds=embeds,
                      options=DoSSROptions(steps=1))
