"""DAPE tagger benchmark: full-size official architecture (Swin-L 384, 4585 tags), random weights.

Writes synthetic official-format files (``{'model': ...}`` RAM tagging tensors incl. the Swin
buffers the loader drops, and a DAPE LoRA dict) to a temporary folder, then in a fresh process
measures ``load_dape_tagger`` (time, peak RSS) and the latency of one image (a 512×512 LQ, as
OSEDiff's ×4 of 128×128, resized to 384 inside). The real ``ram_swin_large_14m.pth`` also holds
~4.7 GB of text BERTs that the memory-mapped loader never reads, so its load peak should be close.

    python bench/bench_dape.py --out bench/results/dape_cpu.json
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from common import child_result, environment, rss_peak_mb, summary, timed, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = {"swin": {"image_size": 384, "patch_size": 4, "embed_dim": 192, "depths": [2, 2, 18, 2],
                   "num_heads": [6, 12, 24, 48], "window_size": 12, "mlp_ratio": 4.0, "patch_norm": True},
          "label_dim": 512, "hidden": 768, "layers": 2, "intermediate": 3072, "heads": 4, "num_tags": 4585}


def write_files(folder):
    from comfyui_diffsr.osediff_core.dape import DAPETagger

    torch.manual_seed(0)
    model = DAPETagger(CONFIG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    lora = {}
    for name, mod in model.named_modules():
        if name.endswith("attn.qkv"):
            dim = mod.in_features
            sd[name.rsplit(".", 1)[0] + ".relative_position_index"] = torch.zeros(144, 144, dtype=torch.long)
            lora[name + ".lora_A"] = torch.randn(16, dim) * 0.01
            lora[name + ".lora_B"] = torch.randn(2 * dim, 8) * 0.01
        elif name.endswith(("crossattention.self.query", "crossattention.self.key")):
            lora[name + ".lora_A"] = torch.randn(8, mod.in_features) * 0.01
            lora[name + ".lora_B"] = torch.randn(mod.out_features, 8) * 0.01
    del model
    ram, dape = os.path.join(folder, "ram.pth"), os.path.join(folder, "dape.pth")
    torch.save({"model": sd}, ram)
    torch.save(lora, dape)
    return ram, dape


def child(ram, dape, repeats, threads):
    if threads:
        torch.set_num_threads(threads)
    from comfyui_diffsr.osediff_core.dape import load_dape_tagger

    base = rss_peak_mb()
    start = time.perf_counter()
    tagger = load_dape_tagger(ram, dape)
    load_s = time.perf_counter() - start
    load_peak = rss_peak_mb()
    image = torch.rand(1, 3, 512, 512)
    times = timed(lambda: tagger.tags(image), repeats)
    print(json.dumps({"load_s": load_s, "rss_before_load_mb": base, "rss_peak_after_load_mb": load_peak,
                      "rss_peak_after_inference_mb": rss_peak_mb(), "latency": summary(times),
                      "params_m": sum(p.numel() for p in tagger.parameters()) / 1e6,
                      "env": environment(torch.device("cpu"), torch.float32)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "dape_cpu.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.repeats, args.threads)
    with tempfile.TemporaryDirectory() as folder:
        ram, dape = write_files(folder)
        sizes = {"ram_file_mb": os.path.getsize(ram) / 2**20, "dape_file_mb": os.path.getsize(dape) / 2**20}
        out = child_result([sys.executable, os.path.abspath(__file__), "--child", ram, dape, "--repeats",
                            str(args.repeats), "--threads", str(args.threads)], cwd=HERE)
    result = {"benchmark": "dape_tagger_cpu_fp32", "input": "1x3x512x512 LQ -> 384x384", **sizes, **out}
    write_json(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
