"""Times the official DoSSR inference (run with the official code's own venv and PYTHONPATH=<checkout>).

Builds the official ControlLDM from its SD 2.1 yaml with random weights (OpenCLIP ViT-H text tower
built without pretrained weights), saves it as an official-layout ``.ckpt`` at --save-ckpt (so our side
loads the very same weights), then runs the official ``scripts/inference.py`` main() on --warmup + --repeats
copies of the LR image (5 steps, sr_scale 4, on --device) and times each ``process()`` call after the warm-up ones.
With --serve each call waits for its turn from a driver (bench/interleave.py).
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

from interleave import peak_rss_mb  # bench/, beside this script


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--lr", required=True)
    p.add_argument("--save-ckpt", required=True)
    p.add_argument("--only-save", action="store_true", help="build and save the random weights, then stop")
    p.add_argument("--reuse-ckpt", action="store_true", help="--save-ckpt exists already: run on it")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--serve", action="store_true",
                   help="take runs from a driver (bench/interleave.py): each process() call waits for its turn")
    a = p.parse_args()
    a.lr, a.save_ckpt = os.path.abspath(a.lr), os.path.abspath(a.save_ckpt)
    os.chdir(a.upstream)
    import setuptools  # noqa: F401  (Python >= 3.12 has no distutils, which the official RRDB imports: setuptools' own)
    import open_clip

    create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda arch, device=None, pretrained=None, **kw: create(arch, device=device)
    if not hasattr(torch, "get_autocast_gpu_dtype"):
        torch.get_autocast_gpu_dtype = lambda: torch.get_autocast_dtype("cuda")
    if a.device == "cpu":
        torch.Tensor.cuda = lambda self, *x, **k: self
        torch.nn.Module.cuda = lambda self, *x, **k: self
    from omegaconf import OmegaConf
    from utils.common import instantiate_from_config

    config = os.path.join(a.upstream, "configs", "model", "cldm_v21.yaml")
    if not a.reuse_ckpt:
        torch.manual_seed(0)
        model = instantiate_from_config(OmegaConf.load(config))
        torch.save({"state_dict": model.state_dict()}, a.save_ckpt)
        del model
    if a.only_save:
        return
    spec = importlib.util.spec_from_file_location("dossr_inference", os.path.join(a.upstream, "scripts", "inference.py"))
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    times = []
    process = inference.process
    # --serve: serve() runs in a thread, started once the model is loaded (the first process() call), and
    # hands each turn the driver gives to the next process() call of main()
    turn_start, turn_done, turns = threading.Semaphore(0), threading.Semaphore(0), []

    def one_turn():
        turn_start.release()
        turn_done.acquire()

    def timed_process(*args, **kw):
        if a.serve:
            if not turns:
                from interleave import serve  # bench/, beside this script

                turns.append(threading.Thread(target=serve, args=(one_turn,), daemon=True))
                turns[0].start()
            turn_start.acquire()
        begin = time.perf_counter()
        out = process(*args, **kw)
        times.append(time.perf_counter() - begin)
        if a.serve:
            turn_done.release()
        return out

    inference.process = timed_process
    work = tempfile.mkdtemp()
    os.makedirs(os.path.join(work, "in"))
    for i in range(a.warmup + a.repeats):
        shutil.copy(a.lr, os.path.join(work, "in", f"lr{i}.png"))
    sys.argv = ["inference.py", "--ckpt", a.save_ckpt, "--config", config, "--input", os.path.join(work, "in"),
                "--steps", str(a.steps), "--sr_scale", "4", "--output", os.path.join(work, "out"), "--device", a.device]
    inference.main()
    shutil.rmtree(work)
    if a.serve:
        turns[0].join()
        return
    runs = times[a.warmup:] or times
    print(json.dumps({"case": "128->512", "steps": a.steps, "median_s": statistics.median(runs), "runs": len(runs),
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
