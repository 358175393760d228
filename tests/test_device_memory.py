"""What the full-size networks hold on a device at once, counted on the meta device (bench/meta_memory.py): the
tiled VAE decoder and the RRDB's ×4 tail in fp16, the largest tensors of a 512→2048 upscale."""

import contextlib
import dataclasses
import importlib.util
import os
import types

import pytest
import torch
import torch.nn.functional as F

from comfyui_diffsr.dossr_core import rrdb as rrdb_module
from comfyui_diffsr.dossr_core.rrdb import RRDBNet
from comfyui_diffsr.sr_common import latents, offload, tiled_vae
from comfyui_diffsr.sr_common.fast_modules import fast_modules, fast_vae_decoder, forget_folded_kernels, phase_kernels
from comfyui_diffsr.sr_common.latents import vae_decode
from comfyui_diffsr.sr_common.sd21 import (NetworksOnSD21, models_from_config, move_module, shipped_config_dir,
                                           weight_bytes)

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
MiB = 2 ** 20


def meta_memory():
    spec = importlib.util.spec_from_file_location("meta_memory", os.path.join(BENCH, "meta_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


counted = pytest.mark.skipif(not meta_memory().storages_keep_their_object(),
                             reason=f"PyTorch {torch.__version__} makes a new object at every access to a storage")


def activations(run, *modules, fused_attention=True):
    """Peak bytes ``run()`` holds beyond the weights of ``modules``, all on the meta device (attention counted as
    the fused kernels run it, ``FusedAttention``)."""
    mm = meta_memory()
    allocator = mm.MetaAllocator()
    allocator.hold_weights(*modules)
    weights = allocator.live
    with torch.no_grad(), allocator, mm.FusedAttention() if fused_attention else contextlib.nullcontext():
        run()
    return allocator.peak - weights


@counted
def test_meta_allocator_counts_storages_while_they_live():
    mm = meta_memory()
    allocator = mm.MetaAllocator()
    with allocator:
        a = torch.empty(1000, device="meta")  # 4000 bytes, rounded up to 4096
        b = a + 1
        view = b[10:]
        assert allocator.live == 2 * 4096
        del a
        assert allocator.live == 4096  # the view holds no storage of its own
        c = view.to(torch.float16)
        assert allocator.live == 4096 + 2048 and allocator.peak == 2 * 4096
        del b, view
        assert allocator.live == 2048
        assert bool(torch.isfinite(c).all()) and c.sum().item() == 1  # made-up data
        assert torch.equal(c.cpu(), torch.zeros(990, dtype=torch.float16))
        del c
    assert allocator.live == 0


@counted
def test_fused_attention_holds_no_score_matrix():
    q = torch.empty(1, 1, 4096, 64, device="meta")
    attention = lambda: F.scaled_dot_product_attention(q, q, q)
    assert activations(attention, fused_attention=False) >= 4096 * 4096 * 4  # the meta device's math path
    assert activations(attention) == q.numel() * 4  # the output alone


def full_size_decoder(dtype):
    """SD 2.1's VAE (the shipped config) on the meta device, in ``dtype``, its decoder as the pipelines run it."""
    _, vae, _ = models_from_config(shipped_config_dir(), random_init=False)
    fast_vae_decoder(vae.decoder)
    return move_module(vae, dtype=dtype)


@counted
def test_tiled_decoder_holds_two_tile_sized_copies_in_fp16():
    """512→2048 (a 256² latent) at the default decoder tile, 224: four tiles of 150² latent px (with margins),
    1200² px each. The largest tensors are 256-channel ones at a tile's full resolution, A = 703 MiB in fp16: at
    most two of them are alive at once, besides the 512-channel latent stage (64 MiB): 1491 MiB. Before, 2544 MiB:
    a float32 copy of the tile for the GroupNorm statistics (2A on its own), the ×2 upsampler's four phases at
    once, and each norm and residual sum written to a new tensor."""
    vae = full_size_decoder(torch.float16)
    z = torch.empty(1, 4, 256, 256, device="meta", dtype=torch.float32)
    full = 256 * (8 * (128 + 2 * tiled_vae.DECODER_PAD)) ** 2 * 2
    held = activations(lambda: vae_decode(vae, z, 224), vae)
    assert 2 * full <= held <= 2 * full + 160 * MiB, held / MiB


@counted
def test_folding_an_upsampler_holds_little_beside_its_kernels():
    """The phase kernels of the UNet's largest ×2 upsampler (1280 channels, fp16): 50 MiB, folded in float64 a few
    output channels at a time, so the fold holds at most 32 MiB more (25 MiB; at once: 500 MiB)."""
    with torch.device("meta"):
        conv = torch.nn.Conv2d(1280, 1280, 3, padding=1).to(torch.float16)
    kernels = 4 * 1280 * 1280 * 2 * 2 * 2
    held = activations(lambda: phase_kernels(conv.weight), conv)
    assert kernels <= held <= kernels + 32 * MiB, held / MiB


def test_rrdb_tail_in_tiles_is_the_whole_tail(monkeypatch):
    torch.manual_seed(0)
    net = RRDBNet(num_feat=16, num_block=1, num_grow_ch=8).eval()
    feat = torch.rand(1, 16, 40, 57).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        whole = net.tail(feat)
        monkeypatch.setattr(rrdb_module, "TAIL_TILE", 8)  # 5 × 7 tiles
        tiled = net.tiled_tail(feat)
        assert tiled.shape == whole.shape and tiled.is_contiguous()
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)
        monkeypatch.setattr(rrdb_module, "TAIL_MARGIN", 1)  # too narrow: the tile borders show
        assert (net.tiled_tail(feat) - whole).abs().max() > 1e-5


@counted
def test_rrdb_holds_tile_sized_tensors_at_4x():
    """A 512² LR through the full-size RRDB (23 blocks, 64 features) in fp16: its ×4 tail in tiles holds 64-channel
    tensors of one tile (528² px, 34 MiB), not of the whole 2048² output (512 MiB each): 288 MiB, against 1536 MiB
    untiled."""
    with torch.device("meta"):
        net = RRDBNet().to(torch.float16)
    lr = torch.empty(1, 3, 512, 512, device="meta", dtype=torch.float16)
    held = activations(lambda: net(lr), net)
    output = 3 * 2048 * 2048 * 2
    assert held <= output + 400 * MiB, held / MiB


@counted
@pytest.mark.parametrize("latent, tile", [(240, 224), (256, 224), (256, 96), (200, 64), (96, 224)])
def test_decoder_estimate_covers_the_count(latent, tile):
    """``decoder_activation_bytes`` (4 copies) against the meta count (3 untiled: 240 and 96 at tile 224; 2 tiled)."""
    vae = full_size_decoder(torch.float16)
    z = torch.empty(1, 4, latent, latent, device="meta")
    held = activations(lambda: vae_decode(vae, z, tile), vae)
    estimate = tiled_vae.decoder_activation_bytes(vae.decoder, latent, latent, tile, torch.float16)
    assert held <= estimate <= 2.5 * held, (held / MiB, estimate / MiB)


@counted
@pytest.mark.parametrize("size, tile", [(2048, 1024), (1024, 1024), (1536, 512)])
def test_encoder_estimate_covers_the_count(size, tile):
    """``encoder_activation_bytes`` (6 copies) against the meta count (5 untiled: 1024 px at tile 1024; 3.4 and 4.7
    tiled)."""
    vae = full_size_decoder(torch.float16)
    fast_modules(vae.encoder)
    pair = {"encoder": vae.encoder, "quant_conv": vae.quant_conv}
    image = torch.empty(1, 3, size, size, device="meta")
    held = activations(lambda: latents.encode_moments(pair, image, tile), vae.encoder, vae.quant_conv)
    estimate = latents.encode_moments_bytes(pair, image, tile)
    assert held <= estimate <= 2.5 * held, (held / MiB, estimate / MiB)


def full_size_denoisers(dtype):
    """SD 2.1's UNet (the shipped config) with its fast modules, and DoSSR's ControlNet (the shipped yaml), on the
    meta device in ``dtype``."""
    from comfyui_diffsr.dossr_core.weights import empty_controlnet, load_ldm_configs

    unet, _, _ = models_from_config(shipped_config_dir(), random_init=False)
    fast_modules(unet)
    _, config, _ = load_ldm_configs()
    return move_module(unet, dtype=dtype), move_module(empty_controlnet(config), dtype=dtype)


@counted
@pytest.mark.parametrize("latent, tile, batch", [(64, 96, 1), (256, 96, 1), (256, 96, 4), (192, 0, 1)])
def test_denoiser_estimate_covers_the_count(latent, tile, batch):
    """``denoiser_bytes`` against the meta count of OSEDiff's UNet (19 copies) and DoSSR's ControlNet + UNet (26),
    the phase kernels folded in the run (113 MiB) included: within 4 %, 64² latent untiled (OSEDiff 158 MiB, DoSSR
    176), 512→2048 at the default tile (217 / 258) and with 4 tiles at once (521 / 685), 192² untiled (518 / 680)."""
    from comfyui_diffsr.dossr_core.pipeline import Options, make_eps_model
    from comfyui_diffsr.osediff_core.pipeline import predict_eps

    unet, controlnet = full_size_denoisers(torch.float16)
    z = torch.empty(1, 4, latent, latent, device="meta")
    context = torch.empty(1, 77, 1024, device="meta", dtype=torch.float16)
    forget_folded_kernels(unet)
    estimate = latents.denoiser_bytes(unet, z, tile, 32, batch)
    held = activations(lambda: predict_eps(unet, z, context, tile=tile, overlap=32, tile_batch=batch), unet)
    assert held <= estimate <= 1.1 * held, (held / MiB, estimate / MiB)
    assert latents.denoiser_bytes(unet, z, tile, 32, batch) < estimate  # the kernels are kept now
    forget_folded_kernels(unet)
    dossr = types.SimpleNamespace(unet=unet, controlnet=controlnet, dtype=torch.float16)
    eps = make_eps_model(dossr, z, context, Options(tile_latent=tile, tile_batch=batch))
    estimate = latents.denoiser_bytes(unet, z, tile, 32, batch, latents.CONTROLLED_UNET_COPIES)
    held = activations(lambda: eps(z, 499), unet, controlnet)
    assert held <= estimate <= 1.1 * held, (held / MiB, estimate / MiB)


class Networks:
    """A model's ``modules()``, all the ``OffloadWhenShort`` reads of it."""

    def __init__(self, *networks):
        self.networks = networks

    def modules(self):
        return list(self.networks)


@counted
def test_networks_of_other_stages_leave_a_device_short_of_memory(monkeypatch):
    """Before a stage, where the free memory is short of the stage's activations (and its networks not on the
    device yet), the other networks go to the CPU, largest first and no more than needed; one sharing weights with
    the stage's stays. A network moved off comes back for its own stage. Without a free-memory reading (not a CUDA
    device) nothing moves off."""
    monkeypatch.setattr(offload, "MIN_FREE_BYTES", 0)
    allocator = meta_memory().MetaAllocator()
    with torch.device("meta"):
        big, mid, small = torch.nn.Linear(1024, 1024), torch.nn.Linear(512, 512), torch.nn.Linear(256, 256)
    sharing = torch.nn.Sequential(small)  # shares small's weights
    model = Networks(big, mid, small, sharing)
    allocator.hold_weights(big, mid, small)
    cap = allocator.live + 3 * MiB
    loader = offload.OffloadWhenShort("meta", free_bytes=lambda: cap - allocator.live)
    where = lambda: [next(m.parameters()).device.type for m in (big, mid, small, sharing)]
    with allocator:
        loader(model, [small], 2 * MiB)  # 3 MiB free: room
        assert where() == ["meta"] * 4
        loader(model, [small], 5 * MiB)  # short by 2 MiB: the 4 MiB network goes
        assert where() == ["cpu", "meta", "meta", "meta"] and cap - allocator.live >= 5 * MiB
        loader(model, [big], 0)  # it comes back: its 4 MiB fit in the 7 MiB now free
        assert where() == ["meta"] * 4
        loader(model, [small], 4 * MiB)  # short by 1 MiB: the largest goes, though the 1 MiB one would do
        assert where() == ["cpu", "meta", "meta", "meta"]
        never = offload.OffloadWhenShort("meta", free_bytes=lambda: None)
        never(model, [mid], 100 * MiB)
        assert where() == ["cpu", "meta", "meta", "meta"]
        never(model, [big], 0)
        assert where() == ["meta"] * 4


@counted
def test_a_stage_needs_at_least_the_minimum_free_and_moves_nothing_when_that_is_free():
    """A stage whose networks are on the device and whose activations are estimated at nothing still needs
    ``MIN_FREE_BYTES`` free: one byte less and the other network leaves the device; exactly that much, nothing moves."""
    allocator = meta_memory().MetaAllocator()
    with torch.device("meta"):
        stage, other = torch.nn.Linear(256, 256), torch.nn.Linear(512, 512)
    allocator.hold_weights(stage, other)
    model = Networks(stage, other)
    device = lambda m: next(m.parameters()).device.type
    with allocator:
        offload.OffloadWhenShort("meta", free_bytes=lambda: offload.MIN_FREE_BYTES)(model, [stage], 0)
        assert (device(stage), device(other)) == ("meta", "meta")
        offload.OffloadWhenShort("meta", free_bytes=lambda: offload.MIN_FREE_BYTES - 1)(model, [stage], 0)
        assert (device(stage), device(other)) == ("meta", "cpu")


@counted
def test_a_network_the_loader_placed_leaves_like_the_models(monkeypatch):
    """A network not of the model (the commands' DAPE tagger) that the loader put on the device for its stage leaves
    it like the model's networks when a later stage is short of memory."""
    monkeypatch.setattr(offload, "MIN_FREE_BYTES", 0)
    allocator = meta_memory().MetaAllocator()
    with torch.device("meta"):
        unet = torch.nn.Linear(512, 512)  # 1 MiB
    tagger = torch.nn.Linear(1024, 1024)  # 4 MiB, on the CPU
    model = Networks(unet)
    allocator.hold_weights(unet)
    cap = allocator.live + 5 * MiB
    loader = offload.OffloadWhenShort("meta", free_bytes=lambda: cap - allocator.live)
    device = lambda m: next(m.parameters()).device.type
    with allocator:
        loader(model, [tagger], 0)  # 5 MiB free: room for it
        assert (device(tagger), device(unet)) == ("meta", "meta")
        loader(model, [unet], 2 * MiB)  # 1 MiB free: the tagger goes
        assert (device(tagger), device(unet)) == ("cpu", "meta") and cap - allocator.live >= 2 * MiB


@counted
def test_weights_in_one_file_buffer_count_their_own_bytes(monkeypatch):
    """Weights read into one buffer (a checkpoint loaded in memory: every tensor a view of the file's bytes) count
    the bytes a move copies, not the buffer's once per tensor: a stage that fits moves nothing else off."""
    monkeypatch.setattr(offload, "MIN_FREE_BYTES", 0)
    allocator = meta_memory().MetaAllocator()
    with torch.device("meta"):
        other = torch.nn.Linear(1024, 1024)  # 4 MiB
    buffer = torch.zeros(4 * 2 ** 20)  # 16 MiB: the file
    stage = torch.nn.Linear(256, 256)  # 0.25 MiB of it
    stage.weight = torch.nn.Parameter(buffer[:256 * 256].view(256, 256))
    stage.bias = torch.nn.Parameter(buffer[256 * 256:256 * 257])
    assert offload.weight_bytes(stage) == (256 * 257) * 4
    allocator.hold_weights(other)
    cap = allocator.live + 2 * MiB
    loader = offload.OffloadWhenShort("meta", free_bytes=lambda: cap - allocator.live)
    with allocator:
        loader(Networks(other, stage), [stage], MiB)  # 1.25 MiB needed, 2 MiB free
    assert next(other.parameters()).device.type == "meta" and stage.weight.device.type == "meta"


def test_a_tensor_two_networks_share_counts_once():
    """A tensor in two of the networks given (OSEDiff's LQ encoder merged into the VAE's own encoder, tied weights)
    counts once, as moving them copies it once: numel × 4 bytes of each distinct float32 tensor."""
    vae = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    assert weight_bytes(vae, vae[0]) == weight_bytes(vae) == (16 * 32 + 32 + 32 * 16 + 16) * 4
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.weight = a.weight
    assert weight_bytes(a, b) == (8 * 8 + 8 + 8) * 4


@dataclasses.dataclass
class TwoNetworks:
    """The fields and ``modules()`` ``NetworksOnSD21.load_stage`` reads."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    stage_loader: object = None
    load_stage = NetworksOnSD21.load_stage

    def modules(self):
        return [self.unet, self.vae]


@pytest.mark.parametrize("refused_by", ["ram", "ram on Windows", "device"])
def test_what_ran_out_while_a_stage_loads_is_named(monkeypatch, refused_by):
    """Out of memory while a stage loads names the memory that ran out: the device's, where its weights did not
    fit, or the computer's, where the networks moved off the device to make room did not (the CPU allocator's
    RuntimeError). Either way smaller tiles cannot help, so it is a ``WeightsOutOfMemory``."""
    from comfyui_diffsr.sr_common.tiling import WeightsOutOfMemory

    with torch.device("meta"):
        model = TwoNetworks(torch.nn.Linear(256, 256), torch.nn.Linear(1024, 1024))
    free = 0 if refused_by.startswith("ram") else 2 ** 40  # none: the VAE goes first; plenty: only the UNet moves
    model.stage_loader = offload.OffloadWhenShort("meta", free_bytes=lambda: free)
    cpu_refused = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 4194304 bytes. Error code 12 (Cannot allocate memory)")
    if refused_by == "ram on Windows":
        cpu_refused = RuntimeError(r"[enforce fail at ..\c10\core\impl\alloc_cpu.cpp:72] data. DefaultCPUAllocator: "
                                   "not enough memory: you tried to allocate 4194304 bytes.")
    real_move = offload.move_module

    def move(module, device, dtype=None):
        if torch.device(device).type == "cpu" and refused_by.startswith("ram"):
            raise cpu_refused
        if torch.device(device).type == "meta" and refused_by == "device":
            raise torch.cuda.OutOfMemoryError("out of memory (simulated)")
        real_move(module, device, dtype)

    monkeypatch.setattr(offload, "move_module", move)
    model.unet.to_empty(device="cpu")  # the stage's network, to load; the VAE on the device, to move off first
    with pytest.raises(WeightsOutOfMemory) as error:
        model.load_stage([model.unet])
    message = str(error.value)
    assert "weights of unet (0.00 GiB in float32)" in message and "smaller tiles cannot help" in message, message
    if refused_by.startswith("ram"):
        assert message.startswith("Out of the computer's memory (RAM, not meta's) while networks moved off meta")
        assert message.endswith("To fix: close other programs, choose dtype fp16 or bf16 (half the weights' memory) "
                                "or give the computer more memory (or swap).")
        assert error.value.__cause__ is cpu_refused
    else:
        assert message.startswith("Out of memory while moving the weights of unet (0.00 GiB in float32) to meta")
        assert message.endswith("choose dtype fp16 or bf16 (half the weights' memory) or run on the CPU.")


def test_free_bytes_of_a_gpu_count_what_the_allocator_holds_unused(monkeypatch):
    """As ComfyUI's get_free_memory: the device's free memory + PyTorch's reserved − allocated (the cache it would
    reuse); no reading (None) on the CPU."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * MiB, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * MiB)
    assert latents.device_free_bytes(torch.device("cuda", 0)) == 9 * MiB
    assert latents.device_free_bytes(torch.device("cpu")) is None


def test_vae_estimates_take_the_precision_of_its_weights():
    """The decode and encode estimates count activations in the VAE's own dtype: a float16 or bfloat16 VAE needs half
    what the float32 one does, at the same latent, image and tiles."""
    z = torch.empty(1, 4, 96, 80, device="meta")
    image = torch.empty(1, 3, 768, 640, device="meta")
    decode, encode = {}, {}
    vae = full_size_decoder(torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        vae = move_module(vae, dtype=dtype)
        decode[dtype] = latents.vae_decode_bytes(vae, z, 64)
        encode[dtype] = latents.encode_moments_bytes({"encoder": vae.encoder, "quant_conv": vae.quant_conv}, image, 512)
    for estimate in (decode, encode):
        assert estimate[torch.float32] > 0
        assert estimate[torch.float16] == estimate[torch.bfloat16] == estimate[torch.float32] // 2


def test_decoder_tile_is_the_largest_that_fits():
    decoder = full_size_decoder(torch.float16).decoder  # meta weights: only the shapes matter
    need = lambda tile: tiled_vae.decoder_activation_bytes(decoder, 240, 240, tile, torch.float16)
    fit = lambda tile, free: tiled_vae.fit_decoder_tile(decoder, 240, 240, tile, torch.float16, free)
    assert need(224) > 7 * 2 ** 30  # 480→1920 at the default tile: the 240² latent whole
    assert fit(224, need(224)) == 224
    free = 2 * 2 ** 30
    fitted = fit(224, free)
    assert need(fitted) <= free and all(need(t) > free for t in range(fitted + 8, 225, 8)) and fitted % 8 == 0
    assert fit(224, 1) == tiled_vae.DECODER_TILE_FLOOR and fit(0, 1) == 0  # 0: never tile, as asked


@pytest.mark.parametrize("mode, fitted", [("bounded", True), ("official", False), ("exact", False)])
def test_decode_on_a_gpu_takes_the_tile_that_fits(monkeypatch, mode, fitted):
    """``vae_decode`` where ``device_free_bytes`` reports 2 GiB (as on a CUDA device): the bounded mode gets the
    fitted tile; the official and exact modes hold every tile at once anyway and keep theirs (the official one is
    part of its algorithm)."""
    vae = full_size_decoder(torch.float16)
    seen = []
    monkeypatch.setattr(latents, "device_free_bytes", lambda device: 2 * 2 ** 30)
    monkeypatch.setattr(latents, "tiled_forward", lambda net, h, tile, **kw: seen.append(tile) or h)
    vae_decode(vae, torch.empty(1, 4, 240, 240, device="meta"), 224, mode=mode)
    expected = tiled_vae.fit_decoder_tile(vae.decoder, 240, 240, 224, torch.float16, 2 * 2 ** 30)
    assert seen == [expected if fitted else 224] and expected < 224
