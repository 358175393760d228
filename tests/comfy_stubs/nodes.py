"""Stand-in for nodes.py (a125cd8): the latent nodes that pass a LATENT's other keys on (``s = samples.copy()``)."""

import torch


class LatentFromBatch:  # L1189-1219 (its noise_mask part left out)
    def frombatch(self, samples, batch_index, length):
        s = samples.copy()
        s_in = samples["samples"]
        batch_index = min(s_in.shape[0] - 1, batch_index)
        length = min(s_in.shape[0] - batch_index, length)
        s["samples"] = s_in[batch_index:batch_index + length].clone()
        if "batch_index" not in s:
            s["batch_index"] = [x for x in range(batch_index, batch_index + length)]
        else:
            s["batch_index"] = samples["batch_index"][batch_index:batch_index + length]
        return (s,)


class RepeatLatentBatch:  # L1221-1245 (its noise_mask part left out)
    def repeat(self, samples, amount):
        s = samples.copy()
        s_in = samples["samples"]
        s["samples"] = s_in.repeat((amount,) + ((1,) * (s_in.ndim - 1)))
        if "batch_index" in s:
            offset = max(s["batch_index"]) - min(s["batch_index"]) + 1
            s["batch_index"] = s["batch_index"] + [x + (i * offset) for i in range(1, amount) for x in s["batch_index"]]
        return (s,)


class LatentUpscaleBy:  # L1281-1298; comfy/utils.py common_upscale (L861-891) with crop "disabled" and the methods
    # other than bislerp and lanczos is this interpolate
    def upscale(self, samples, upscale_method, scale_by):
        s = samples.copy()
        width = round(samples["samples"].shape[-1] * scale_by)
        height = round(samples["samples"].shape[-2] * scale_by)
        s["samples"] = torch.nn.functional.interpolate(samples["samples"], size=(height, width), mode=upscale_method)
        return (s,)


class LatentCrop:  # L1427-1458: x, y, width and height in pixels, multiples of 8 (the widgets' step)
    def crop(self, samples, width, height, x, y):
        s = samples.copy()
        samples = samples['samples']
        x = x // 8
        y = y // 8

        # enfonce minimum size of 64
        if x > (samples.shape[3] - 8):
            x = samples.shape[3] - 8
        if y > (samples.shape[2] - 8):
            y = samples.shape[2] - 8

        new_height = height // 8
        new_width = width // 8
        to_x = new_width + x
        to_y = new_height + y
        s['samples'] = samples[:, :, y:to_y, x:to_x]
        return (s,)
