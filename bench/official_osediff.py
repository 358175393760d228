"""Times the official OSEDiff forward (run with the official code's own venv; our code is not imported).

Same protocol as bench_osediff.py: an LQ of --size px upscaled ×4 with PIL bicubic, then
``OSEDiff_test.forward`` (prompt encoding, VAE encode, UNet, decode), median over --repeats after
--warmup untimed runs, peak RSS of the process.
"""

import argparse
import json
import os
import statistics
import time

import torch

from interleave import peak_rss_mb  # bench/, beside this script


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (0 for the large cases)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--serve", action="store_true", help="take runs from a driver (bench/interleave.py)")
    a = p.parse_args()
    a.base, a.weights = os.path.abspath(a.base), os.path.abspath(a.weights)
    os.chdir(a.upstream)  # run with PYTHONPATH=<upstream>: the official code imports its modules by top-level name
    if a.device == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kw: self
        torch.nn.Module.cuda = lambda self, *args, **kw: self
        _to = torch.nn.Module.to
        torch.nn.Module.to = lambda self, *args, **kw: _to(self, *[("cpu" if x == "cuda" else x) for x in args],
                                                           **{k: ("cpu" if v == "cuda" else v) for k, v in kw.items()})
        _tensor = torch.tensor
        torch.tensor = lambda *args, **kw: _tensor(*args, **{k: ("cpu" if str(v) == "cuda" else v)
                                                             for k, v in kw.items()})
        from my_utils import devices  # the official tiled VAE creates its tensors on devices.device

        devices.device = torch.device("cpu")
    from osediff import OSEDiff_test
    import diffusers

    _set = diffusers.DDPMScheduler.set_timesteps
    diffusers.DDPMScheduler.set_timesteps = lambda self, n, device=None: _set(self, n, device="cpu")
    args = argparse.Namespace(pretrained_model_name_or_path=a.base, osediff_path=a.weights, merge_and_unload_lora=False,
                              mixed_precision="fp16" if a.dtype == "fp16" else "fp32", vae_decoder_tiled_size=224,
                              vae_encoder_tiled_size=1024, latent_tiled_size=96, latent_tiled_overlap=32)
    model = OSEDiff_test(args)
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    lr = (torch.rand(a.size, a.size, 3, generator=g) * 255).byte().numpy()
    img = Image.fromarray(lr).resize((a.size * 4, a.size * 4))
    lq = (torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)[None].float() / 255).to(a.device)
    # its forward returns the output on the GPU with the VAE decode still queued: wait for it, as ours (which returns
    # a CPU tensor) always does
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if a.serve:
        from interleave import serve  # bench/, beside this script

        with torch.no_grad():
            serve(lambda: model(lq * 2 - 1, prompt=", ,"), sync)
        return
    times = []
    with torch.no_grad():
        for i in range(a.warmup + a.repeats):
            t = time.perf_counter()
            model(lq * 2 - 1, prompt=", ,")
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    print(json.dumps({"case": f"{a.size}->{a.size * 4}", "median_s": statistics.median(times), "runs": len(times),
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
