"""Peak device memory of one upscale, and the network it falls in (full-size architectures, random weights):

    python bench/bench_memory.py --device cuda --dtype fp16 --sizes 128 512 --out bench/results/memory_cuda_fp16.json
    python bench/bench_memory.py --device meta --dtype fp16 --sizes 128 512 --out bench/results/memory_meta_fp16.json

On a GPU the figure is what PyTorch's caching allocator counts (``torch.cuda.max_memory_allocated``), the
convolutions' workspace included; ``peak_device_mib`` adds what the allocator holds beyond that (its peak reserved
memory) and what the process holds outside it (CUDA context, cuBLAS/cuDNN): the memory a card must have. On the
``meta`` device, on any machine, the same run goes through tensors without data (``MetaAllocator``): every storage
is counted from its creation to its release, rounded up to 512 bytes as that allocator rounds it, and attention is
counted as the fused kernels run it (its output only). What the meta count leaves out: the workspace of the
convolutions and of attention, and the CUDA context.

The weights are on the device, the text encoder's not (the prompt embedding is given): as the nodes and the commands
run. With ``--budget-mib N`` the run sees a device of N MiB instead: the commands' ``OffloadWhenShort`` moves the
networks of other stages to the CPU when a stage does not fit in what is left of N, and the decoder's tile fit sees
the same (on any device, the meta one included; on a GPU the budget counts what PyTorch allocated and what the
process holds outside its allocator, as a card of N MiB would). Per network,
the peak while its layers were the last to run (``lq_encoder``, ``unet``, ``vae_decoder`` …; the colour fix and the
resizing count toward the network before them).
"""

import argparse
import os

import torch

from comfyui_diffsr.sr_common import latents
from comfyui_diffsr.sr_common.offload import OffloadWhenShort
from comfyui_diffsr.sr_common.sd21 import weight_bytes
from comfyui_diffsr.sr_common.sd21 import PRECISIONS, ieee_float32, move_module
import interleave
from common import environment, random_osediff, write_json
from meta_memory import FusedAttention, MetaAllocator

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2 ** 20


class CudaMeter:
    """Per-stage peaks of the CUDA allocator (``max_memory_allocated``, reset when the stage changes), and the peak of
    what it reserved over the whole run (``reserved``)."""

    def __init__(self, device):
        self.device, self.peaks, self._stage, self.reserved = device, {}, None, 0

    def enter(self, stage):
        self.peaks[self._stage] = max(self.peaks.get(self._stage, 0), torch.cuda.max_memory_allocated(self.device))
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        self._stage = stage

    def finish(self):
        self.enter(None)
        return self.peaks


class MetaMeter:
    """Per-stage peaks of a ``MetaAllocator`` counting the run (the weights first)."""

    def __init__(self, modules):
        self.allocator = MetaAllocator()
        self.allocator.hold_weights(*modules)

    def enter(self, stage):
        self.allocator.stage = stage

    def finish(self):
        return self.allocator.peaks


def staged(networks, meter):
    """Forward pre-hooks on every layer of each network (name → module) telling ``meter`` the network running."""
    handles = []
    for name, network in networks.items():
        for module in network.modules():
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: meter.enter(name)))
    return handles


def on_budget(model, device, meter, budget):
    """Make ``model``'s run see a device of ``budget`` bytes (see the module's docstring); returns the undo. On a
    GPU that is what ``latents.device_free_bytes`` would find on a card of that size: ``budget`` less what the
    allocator has allocated and less what the process holds outside it (context, workspaces)."""
    free = ((lambda: budget - meter.allocator.live) if isinstance(meter, MetaMeter)
            else (lambda: budget - torch.cuda.memory_allocated(device) - interleave.outside_allocator_bytes()))
    model.stage_loader = OffloadWhenShort(device, "cpu", free_bytes=free)
    real_free = latents.device_free_bytes
    latents.device_free_bytes = lambda _: free()  # the decoder's tile fit (vae_decode)

    def undo():
        latents.device_free_bytes = real_free
        model.stage_loader = None
        for module in model.modules():
            if module is not getattr(model, "text_encoder", None):
                move_module(module, device)
    return undo


def measure(model, upscale, networks, device, budget=None):
    """{"peak_mib", "weights_mib", "by_network_mib"} of one ``upscale(model)`` on ``device`` (cuda or meta), on a
    device of ``budget`` bytes if given (``on_budget``)."""
    modules = [m for m in model.modules() if m is not getattr(model, "text_encoder", None)]
    weights = weight_bytes(*modules)
    meter = CudaMeter(device) if device.type == "cuda" else MetaMeter(modules)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    handles = staged(networks, meter)
    undo = on_budget(model, device, meter, budget) if budget else (lambda: None)
    try:
        with torch.inference_mode():
            if device.type == "cuda":
                meter.enter("start")
                upscale(model)
            else:
                with meter.allocator, FusedAttention():
                    meter.enter("start")
                    upscale(model)
    finally:
        for h in handles:
            h.remove()
        undo()
    peaks = {name: round(v / MiB, 1) for name, v in meter.finish().items() if name is not None and v}
    result = {"peak_mib": max(peaks.values()), "weights_mib": round(weights / MiB, 1), "by_network_mib": peaks}
    if device.type == "cuda":  # what the device holds for the process at most: the 4 GB target is about this
        result["peak_device_mib"] = round((meter.reserved + interleave.outside_allocator_bytes()) / MiB, 1)
    return result


def runner(method):
    """(model on the CPU, the networks by name, upscale(model, size, vae_tile_decode)) of one method: a seeded LR
    image of ``size``², ×4, the prompt embedding given."""
    from bench_dossr import lr_image, random_dossr
    from bench_stages import networks

    embeds = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1))
    if method == "osediff":
        from comfyui_diffsr.osediff_core.pipeline import Options, osediff_upscale

        model = random_osediff()
        upscale = lambda m, size, tile: osediff_upscale(m, lr_image(size), prompt_embeds=embeds.to(m.device, m.dtype),
                                                        options=Options(vae_tile_decode=tile))
    else:
        from comfyui_diffsr.dossr_core.pipeline import Options, dossr_upscale

        model, _ = random_dossr()
        upscale = lambda m, size, tile: dossr_upscale(m, lr_image(size), prompt_embeds=embeds.to(m.device, m.dtype),
                                                      options=Options(steps=5, seed=0, vae_tile_decode=tile))
    return model, networks(model, method), upscale


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["osediff", "dossr"], nargs="+", default=["osediff", "dossr"])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="LQ sizes (output ×4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "meta", choices=["cuda", "meta"])
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp16")
    p.add_argument("--vae-tile-decode", type=int, nargs="+", default=[224], help="latent px, one run each")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="run as on a device of this size: networks offloaded between stages, decoder tile fitted")
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = p.parse_args()
    device, dtype = torch.device(args.device), PRECISIONS[args.dtype]
    result = {"bench": "memory", **environment(device, dtype), "cases": []}
    for method in args.method:
        result["cases"] += method_cases(method, args, device, dtype)  # its networks freed on return
    write_json(result, args.out)


def method_cases(method, args, device, dtype):
    """One method's ``measure`` at each of ``args.sizes`` and ``args.vae_tile_decode``, printed as they are made."""
    model, networks, upscale = runner(method)
    for module in model.modules():  # the text encoder stays on the CPU
        if module is not getattr(model, "text_encoder", None):
            move_module(module, device, dtype)
    cases = []
    for size in args.sizes:
        for tile in args.vae_tile_decode:
            budget = args.budget_mib and int(args.budget_mib * MiB)
            case = {"method": method, "case": f"{size}->{size * 4}", "vae_tile_decode": tile,
                    **({"budget_mib": args.budget_mib} if budget else {}),
                    **measure(model, lambda m: upscale(m, size, tile), networks, device, budget)}
            print(case, flush=True)
            cases.append(case)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return cases


if __name__ == "__main__":
    with ieee_float32():  # float32 as the commands and nodes compute it on a GPU
        main()
