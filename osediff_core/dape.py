"""DAPE prompt extractor: the RAM (Swin-L) image tagger with SeeSR's DAPE LoRA merged in.

Only the tagging path is built: Swin image encoder → ``image_proj`` → a 2-layer cross-attention
head (label queries ``relu(wordvec_proj(label_embed))`` attend to the image tokens; no
self-attention, no embeddings) → ``fc`` → one logit per tag of the 4585-tag RAM list. No text
BERTs, captioner or tokenizer.

Weights: the official ``ram_swin_large_14m.pth`` (``{'model': state_dict}``) plus ``DAPE.pth``
(a flat dict of loralib ``lora_A``/``lora_B`` tensors, rank 8, alpha 1 ⇒ scale 1/8), merged at
load; or our converted safetensors (:func:`convert_dape`), which holds only the tagging tensors
with DAPE merged. Both are read without running code (``torch.load(weights_only=True)``).

Pre-processing and tag selection follow OSEDiff's ``test_osediff.py``: the [0, 1] LQ tensor
(already ×upscale) is resized to 384×384 bilinear without antialias, ImageNet-normalised; a tag
is chosen when ``sigmoid(logit) > threshold`` (per-tag thresholds, strict), tags are listed in
tag-list order and joined with ``", "``.
"""

import difflib
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..sr_common.errors import WeightFileError, releasing_tensors
from ..sr_common.image import (check_image, enlarged_lines, is_8bit, resize, shrink_reads,
                               zeros_taken_when_written)
from ..sr_common.known_files import KNOWN, canonical, describe, identify, unwrap_ram
from ..sr_common.names import quoted_name
from ..sr_common.weights import (DAPE_FORMAT, check_safetensors_output, read_state_dict, require_float,
                                 safetensors_metadata, write_safetensors)
from .swin import SwinEncoder, swin_config

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TAG_LIST = os.path.join(DATA_DIR, "ram_tag_list.txt")
THRESHOLDS = os.path.join(DATA_DIR, "ram_tag_list_threshold.txt")

IMAGE_SIZE = 384
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HEAD_HEADS = 4            # q2l_config.json: num_attention_heads (cannot be read from the weights)
HEAD_LN_EPS = 1e-12       # q2l_config.json: layer_norm_eps
LORA_ALPHA = 1.0          # loralib default; scale = alpha / r

# Keys of the tagging path (official names, after ``vision_multi`` → ``tagging_head``).
TAGGING_PREFIXES = ("visual_encoder.", "image_proj.", "wordvec_proj.", "tagging_head.", "fc.")
TAGGING_KEYS = ("label_embed",)
_DROPPED = ("relative_position_index", "attn_mask")


# ----------------------------------------------------------------------------------------- model
class _QKV(nn.Module):
    def __init__(self, hidden, context):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context, hidden)
        self.value = nn.Linear(context, hidden)


class _AddNorm(nn.Module):
    def __init__(self, n_in, hidden):
        super().__init__()
        self.dense = nn.Linear(n_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=HEAD_LN_EPS)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, hidden, context, heads):
        super().__init__()
        self.heads = heads
        setattr(self, "self", _QKV(hidden, context))  # official name: crossattention.self.query …
        self.output = _AddNorm(hidden, hidden)

    def forward(self, queries, context):
        proj = getattr(self, "self")
        b, n, hidden = queries.shape
        d = hidden // self.heads

        def split(x):
            return x.reshape(x.shape[0], x.shape[1], self.heads, d).transpose(1, 2)

        q, k, v = split(proj.query(queries)), split(proj.key(context)), split(proj.value(context))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, hidden)
        return self.output(out, queries)


class _Dense(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class _HeadLayer(nn.Module):
    """One Query2Label layer as RAM runs it (``mode='tagging'``): cross-attention, then the FFN."""

    def __init__(self, hidden, context, intermediate, heads):
        super().__init__()
        self.crossattention = _CrossAttention(hidden, context, heads)
        self.intermediate = _Dense(hidden, intermediate)
        self.output = _AddNorm(intermediate, hidden)

    def forward(self, queries, context):
        x = self.crossattention(queries, context)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _Layers(nn.Module):
    def __init__(self, n, *args):
        super().__init__()
        self.layer = nn.ModuleList(_HeadLayer(*args) for _ in range(n))


class _TaggingHead(nn.Module):
    def __init__(self, n_layers, hidden, context, intermediate, heads):
        super().__init__()
        self.encoder = _Layers(n_layers, hidden, context, intermediate, heads)

    def forward(self, queries, context):
        for layer in self.encoder.layer:
            queries = layer(queries, context)
        return queries


class DAPETagger(nn.Module):
    """RAM tagging path. ``logits(image01)`` → (B, num_tags); ``tags(image01)`` → one string per image."""

    def __init__(self, config, tag_names=None, thresholds=None):
        super().__init__()
        self.config = dict(config)
        sw = config["swin"]
        self.visual_encoder = SwinEncoder(**sw)
        width = self.visual_encoder.num_features
        label_dim, hidden = config["label_dim"], config["hidden"]
        self.image_proj = nn.Linear(width, label_dim)
        self.label_embed = nn.Parameter(torch.zeros(config["num_tags"], label_dim))
        self.wordvec_proj = nn.Linear(label_dim, hidden)
        self.tagging_head = _TaggingHead(config["layers"], hidden, label_dim, config["intermediate"],
                                         config.get("heads", HEAD_HEADS))
        self.fc = nn.Linear(hidden, 1)
        self.tag_names = list(tag_names) if tag_names is not None else None
        # plain attribute (not a buffer) so that .to(fp16) keeps the thresholds fp32, as the official
        self.thresholds = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float32, device="cpu")

    def preprocess(self, image01):
        """(B, 3, H, W) in [0, 1] → (B, 3, 384, 384) normalised, in the model's dtype and device."""
        if image01.dim() != 4 or image01.shape[1] != 3:
            raise ValueError(f"Expected an image batch (B, 3, H, W), got {tuple(image01.shape)}.")
        p = self.label_embed
        x = image01.to(device=p.device, dtype=torch.float32)
        size = self.visual_encoder.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(p.dtype)

    @torch.no_grad()
    def logits(self, image01):
        """Tag logits (B, num_tags), float32, before the sigmoid."""
        image_embeds = self.image_proj(self.visual_encoder(self.preprocess(image01)))
        queries = F.relu(self.wordvec_proj(self.label_embed))
        queries = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1).float()

    def select(self, logits, *, exclude=(), max_tags=None):
        """Logits (B, num_tags) → one ``", "``-joined tag string per image."""
        if self.tag_names is None or self.thresholds is None:
            raise RuntimeError("This DAPETagger has no tag list/thresholds; load it with load_dape_tagger().")
        probs = torch.sigmoid(logits.float().cpu())
        if self.label_embed.dtype == torch.float16:  # the official fp16 run takes the sigmoid of fp16 logits, whose
            probs = probs.half().float()             # result is fp16 (ram_lora.py L219): compared once rounded
        chosen = probs > self.thresholds
        drop = {str(t).strip().lower() for t in exclude if str(t).strip()}
        if drop:
            keep = torch.tensor([name.lower() not in drop for name in self.tag_names])
            chosen &= keep
        out = []
        for b in range(probs.shape[0]):
            idx = torch.nonzero(chosen[b]).flatten()
            if max_tags is not None and len(idx) > max_tags:
                best = torch.argsort(probs[b, idx], descending=True, stable=True)[: max(0, int(max_tags))]
                idx = torch.sort(idx[best]).values
            out.append(", ".join(self.tag_names[i] for i in idx.tolist()))
        return out

    def tags(self, image01, *, exclude=(), max_tags=None):
        return self.select(self.logits(image01), exclude=exclude, max_tags=max_tags)

    def unknown_tags(self, names):
        """The ``names`` that are none of the tagger's tags, case and surrounding spaces aside (``select`` compares
        them so): an exclude list's misspellings, each with the tag it most likely meant (or None)."""
        known = {name.lower(): name for name in self.tag_names}
        unknown = []
        for name in names:
            if name.strip().lower() not in known:
                close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.85)
                unknown.append((name, known[close[0]] if close else None))
        return unknown

    def forward(self, image01):
        return self.logits(image01)


def read_indices(length):
    """The pixels along an axis of ``length`` that ``DAPETagger.preprocess``'s bilinear resize to ``IMAGE_SIZE``
    reads, sorted: for each output pixel the two either side of its source position ((i + 0.5)·length/IMAGE_SIZE −
    0.5, at least 0: align_corners=False), and the next one out where that position is within PyTorch's float32
    rounding of a pixel (which may carry it across; past a million pixels by more than one). Every pixel where the
    axis is not shrunk."""
    source = ((torch.arange(IMAGE_SIZE, dtype=torch.float64) + 0.5) * (length / IMAGE_SIZE) - 0.5).clamp(min=0)
    slack = 1e-6 * (source + 1)  # float32 rounds it by a few 1e-8 of its size; below 0.5 up to 500k px
    first = (source - slack).floor().long().clamp(min=0)
    last = ((source + slack).floor().long() + 1).clamp(max=length - 1)
    candidates = first[:, None] + torch.arange(int((last - first).max()) + 1)
    return torch.unique(candidates[candidates <= last[:, None]])


def lq_as_read(image, *, upscale=4, process_size=512, official_sizing=False):
    """OSEDiff's LQ of ``image`` (``pipeline.preprocess``'s) as the tagger reads it, without forming the ×upscale
    image: the same numbers at every row and column ``DAPETagger.preprocess`` reads (``read_indices``: 2-3 per output
    pixel of 384), zeros elsewhere, in memory taken only where written, so the tags are those of the whole LQ, bit
    for bit. With ``official_sizing`` the same where its LANCZOS shrink to a multiple of 8 shrinks one side or none
    (``lines_read``); where it shrinks both, the LQ is formed whole: Pillow runs those two passes, each rounded, in an
    order that depends on its version and on the sizes (up to 12.1 the horizontal first; 12.2 and 12.3 the vertical
    first on an image 100 times as tall as wide; 13.0 the vertical first for one size in seven, by no rule of the
    sizes' shrink or cost), which only the whole resize tells. Also where a 16-bit image's lines read are all of 8
    bits: whether PIL takes its 8-bit path is decided by the whole ×upscale image."""
    from .pipeline import enlarge_small, preprocess, upscaled_size

    check_image(image)
    lq = enlarge_small(image, upscale=upscale, process_size=process_size, official_sizing=official_sizing)
    width, height = upscaled_size(lq, upscale, official_sizing)
    kept = (width - width % 8, height - height % 8) if official_sizing else (width, height)
    rows, columns = read_indices(kept[1]), read_indices(kept[0])
    too_small = official_sizing and min(kept) < 8  # refused by preprocess
    lines = None if too_small else lines_read(lq, (width, height), kept, rows, columns)
    if lines is None:  # formed whole (or refused there: too small)
        return preprocess(image, upscale=upscale, process_size=process_size, official_sizing=True)[0]
    out = zeros_taken_when_written((lq.shape[0], 3, kept[1], kept[0]))
    out[:, :, rows[:, None], columns] = lines
    return out


def lines_read(lq, size, kept, rows, columns):
    """``resize(resize(lq, size), kept, "lanczos")`` (``kept`` = ``size`` but on one side at most: one LANCZOS pass)
    at ``rows`` × ``columns`` without forming it: the bicubic ×upscale image (``enlarged_lines``) at the lines that
    pass reads (``shrink_reads``), zeros elsewhere, then the pass, which makes each line from that line alone. None
    where it shrinks both sides, or where the lines read are of 8 bits and ``lq`` is not (the whole may not be)."""
    (width, height), (kept_width, kept_height) = size, kept
    if kept == size:
        return enlarged_lines(lq, size, rows, columns)
    if kept_width < width and kept_height < height:
        return None
    vertical = kept_height < height
    if vertical:
        source = shrink_reads(height, kept_height, rows)
        lines = torch.zeros(lq.shape[0], 3, height, len(columns))
        lines[:, :, source] = enlarged_lines(lq, size, source, columns)
    else:
        source = shrink_reads(width, kept_width, columns)
        lines = torch.zeros(lq.shape[0], 3, len(rows), width)
        lines[..., source] = enlarged_lines(lq, size, rows, source)
    if is_8bit(lines) != is_8bit(lq):
        return None
    if vertical:
        return resize(lines, (len(columns), kept_height), "lanczos")[:, :, rows]
    return resize(lines, (kept_width, len(rows)), "lanczos")[..., columns]


def dape_prompt(tags, user_prompt="", tags_only=False):
    """The OSEDiff prompt: ``f"{tags}, {user_prompt},"`` (``", ,"`` when both are empty)."""
    return tags if tags_only else f"{tags}, {user_prompt},"


def tag_list(text):
    """Comma-separated tags (an exclude list, as typed) → their names, without the spaces around them; empty
    entries dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def misspelt_tags(unknown):
    """``unknown_tags``' result as a message names them: ``'dalmation' (did you mean 'dalmatian'?), 'xyz'``."""
    return ", ".join(f"{name!r}" + (f" (did you mean {close!r}?)" if close else "") for name, close in unknown)


def read_tag_data():
    with open(TAG_LIST, encoding="utf-8") as f:
        names = f.read().splitlines()
    with open(THRESHOLDS, encoding="utf-8") as f:
        thresholds = [float(s.strip()) for s in f if s.strip()]
    if len(names) != len(thresholds):
        raise RuntimeError(f"Tag list ({len(names)}) and thresholds ({len(thresholds)}) differ in length.")
    return names, thresholds


# ------------------------------------------------------------------------------- weight files
def _tagging_subset(ram):
    """Official load-time renames, then only the tagging tensors (still lazy/mmap'd)."""
    out = {}
    for key, value in ram.items():
        if not isinstance(key, str) or key.endswith(_DROPPED):
            continue
        key = key.replace("vision_multi", "tagging_head")
        if key.startswith(TAGGING_PREFIXES) or key in TAGGING_KEYS:
            out[key] = value
    return out


def model_config(state):
    """The architecture stored in a tagging state dict (official names)."""
    layers = sorted({int(m.group(1)) for k in state for m in [re.match(r"tagging_head\.encoder\.layer\.(\d+)\.crossattention\.", k)] if m})
    if not layers or layers != list(range(len(layers))):
        raise WeightFileError("The RAM weights have no tagging head (tagging_head/vision_multi …crossattention…).")
    for key in ("label_embed", "wordvec_proj.weight", "fc.weight", "image_proj.weight"):
        if key not in state:
            raise WeightFileError(f"The RAM weights lack {key!r}; the file is not a RAM tagging checkpoint.")
    label_dim = int(state["label_embed"].shape[1])
    hidden = int(state["wordvec_proj.weight"].shape[0])
    return {
        "swin": swin_config(state, "visual_encoder.", IMAGE_SIZE),
        "label_dim": label_dim,
        "hidden": hidden,
        "layers": len(layers),
        "intermediate": int(state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "heads": HEAD_HEADS,
        "num_tags": int(state["label_embed"].shape[0]),
    }


def _lora_delta(a, b, parts, enabled, name):
    """loralib delta W (before scaling) for Linear (parts=1) or MergedLinear (enable_lora flags)."""
    a, b = a.float(), b.float()
    groups = sum(enabled)
    if a.shape[0] % groups or b.shape[0] % groups:
        raise WeightFileError(f"DAPE LoRA {name}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {groups} groups.")
    r = a.shape[0] // groups
    if b.shape[1] != r:
        raise WeightFileError(f"DAPE LoRA {name}: lora_B has rank {b.shape[1]}, lora_A rank {r}.")
    rows = b.shape[0] // groups
    blocks, g = [], 0
    for on in enabled:
        if on:
            blocks.append(b[g * rows:(g + 1) * rows] @ a[g * r:(g + 1) * r])
            g += 1
        else:
            blocks.append(torch.zeros(rows, a.shape[1]))
    delta = torch.cat(blocks, 0) if parts > 1 else blocks[0]
    return delta, LORA_ALPHA / r


SWIN_LORA = re.compile(r"visual_encoder\..*\.attn\.qkv$")
HEAD_LORA = re.compile(r"tagging_head\.encoder\.layer\.\d+\.crossattention\.self\.(query|key)$")


def _lora_layout(module):
    """(parts, enable_lora) of the loralib layer DAPE puts on ``module`` of the tagging path, or None: Swin
    ``attn.qkv`` a MergedLinear with LoRA on the q and v rows, the head's cross-attention query and key a Linear."""
    if SWIN_LORA.match(module):
        return 3, (True, False, True)
    if HEAD_LORA.match(module):
        return 1, (True,)
    return None


def merge_dape(state, dape, n_layers):
    """Add the DAPE LoRAs of the tagging path to ``state`` (fp32, in place), as loralib's eval() merge.

    DAPE.pth (every LoRA of SeeSR's model) holds one for each module of ``_lora_layout`` (Swin ``attn.qkv``,
    tagging-head cross-attention ``query``/``key``): a file that lacks any is refused. The official model ties the
    head's weights to the lowest ``tag_encoder`` layers, so their LoRAs merge into the same weights: those are
    added too, where present (DAPE never trained them: zero in DAPE.pth). Everything else (tag_encoder above the
    head, text_decoder) is not on the tagging path.
    """
    modules = sorted({k.rsplit(".", 1)[0] for k in dape if k.endswith((".lora_A", ".lora_B"))})
    used, ignored = 0, 0
    for mod in modules:
        for half, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if f"{mod}.{other}" not in dape:
                raise WeightFileError(f"DAPE file has {mod}.{half} but no {mod}.{other}; the file is damaged.")
        target = mod.replace("vision_multi", "tagging_head")
        m = re.match(r"tag_encoder\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)$", target)
        if m and int(m.group(1)) < n_layers:
            target = "tagging_head." + target[len("tag_encoder."):]
        layout = _lora_layout(target)
        if layout is None:
            ignored += 1
            continue
        wkey = target + ".weight"
        if wkey not in state:
            raise WeightFileError(f"DAPE LoRA {mod} has no matching weight {wkey} in the RAM checkpoint: "
                                  "the DAPE and RAM files do not belong together.")
        delta, scale = _lora_delta(dape[mod + ".lora_A"], dape[mod + ".lora_B"], *layout, mod)
        if delta.shape != state[wkey].shape:
            raise WeightFileError(f"DAPE LoRA {mod} gives {tuple(delta.shape)} but {wkey} is "
                                  f"{tuple(state[wkey].shape)}: the DAPE and RAM files do not belong together.")
        state[wkey] = state[wkey].float() + delta * scale
        used += 1
    adapted = [name for name in (k.removesuffix(".weight") for k in state if k.endswith(".weight"))
               if _lora_layout(name)]
    given = {mod.replace("vision_multi", "tagging_head") for mod in modules}
    missing = [name for name in adapted if name not in given]
    if missing:
        raise WeightFileError(f"the DAPE file lacks the LoRA of {len(missing)} of the {len(adapted)} tagging modules "
                              f"DAPE adapts ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it is "
                              "damaged or partly saved; download DAPE.pth again.")
    return used, ignored


def _wrong_file(path, obj, given_as, expected):
    """The error for ``obj``, read from ``path`` and given as ``given_as``: what it is, and the file expected."""
    return WeightFileError(f"{quoted_name(os.path.basename(os.fspath(path)))} was given as {given_as} but it is "
                           f"{describe(obj, path)}. Expected {expected}.")


def _read_ram(path):
    """The RAM state dict of ``ram_swin_large_14m.pth``. A converted tagger is refused though it has the same keys:
    its DAPE LoRA would be merged a second time."""
    obj = read_state_dict(path, mmap=True)
    if identify(obj, path) is not KNOWN["ram"]:
        raise _wrong_file(path, obj, "the RAM weights", "ram_swin_large_14m.pth (a dict with 'model': "
                          "visual_encoder.*, tagging_head/vision_multi.*, label_embed, …)")
    return unwrap_ram(canonical(obj))


def _read_dape(path):
    """The loralib tensors of ``DAPE.pth`` (``<module>.lora_A`` / ``.lora_B``)."""
    obj = read_state_dict(path, mmap=True)
    if identify(obj, path) is not KNOWN["dape"]:
        raise _wrong_file(path, obj, "the DAPE weights", "DAPE.pth: a flat dict of loralib tensors (…attn.qkv.lora_A, "
                          "…lora_B)")
    return canonical(obj)


def _state_from_official(ram_path, dape_path):
    """Tagging tensors (fp32 copies, DAPE merged) and the config, from the two official files."""
    ram_name, dape_name = os.path.basename(os.fspath(ram_path)), os.path.basename(os.fspath(dape_path))
    ram = _read_ram(ram_path)
    dape = _read_dape(dape_path)
    require_float(dape, "DAPE LoRA", dape_name)
    lazy = _tagging_subset(ram)
    try:
        config = model_config(lazy)
    except WeightFileError as e:
        raise WeightFileError(f"{quoted_name(ram_name)}: {e}") from e
    except KeyError as e:  # a tensor the architecture is read from
        raise WeightFileError(f"The RAM checkpoint {quoted_name(ram_name)} lacks {e}; the file is incomplete or a "
                              "different RAM variant.") from e
    wanted = _expected_keys(config)
    missing = [k for k in wanted if k not in lazy]
    if missing:
        raise WeightFileError(f"The RAM checkpoint {quoted_name(ram_name)} lacks {len(missing)} tagging tensors (e.g. "
                              f"{missing[:3]}); the file is incomplete or a different RAM variant.")
    require_float({k: lazy[k] for k in wanted}, "RAM", ram_name)
    state = {k: lazy[k].to(torch.float32, copy=True) for k in wanted}  # copy only what tagging needs
    del lazy, ram
    try:
        merge_dape(state, dape, config["layers"])
    except WeightFileError as e:
        raise WeightFileError(f"{quoted_name(ram_name)} + {quoted_name(dape_name)}: {e}") from e
    return state, config


def _expected_keys(config):
    with torch.device("meta"):
        return list(DAPETagger(config).state_dict().keys())


def _state_from_converted(path):
    name = os.path.basename(os.fspath(path))
    obj = read_state_dict(path)
    meta = safetensors_metadata(path)
    if not meta or meta.get("format") != DAPE_FORMAT:
        raise _wrong_file(path, obj, "a converted DAPE file", "a .safetensors written by convert_dape / `diffsr "
                          "convert dape` (pass the official files as the RAM and DAPE weights instead)")
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError) as e:
        raise WeightFileError(f"{quoted_name(name)} has damaged DAPE metadata (config: {type(e).__name__}: {e}); "
                              "convert the RAM and DAPE files again with `diffsr convert dape`.") from e
    require_float(obj, "DAPE", name)
    return {k: v.float() for k, v in obj.items()}, config


def _build(state, config, device, dtype, source):
    """The tagger from checked weights; ``source`` names the file(s) in error messages."""
    fix = "Use the official ram_swin_large_14m.pth + DAPE.pth, or convert them again with `diffsr convert dape`."
    names, thresholds = read_tag_data()
    try:
        if config["num_tags"] != len(names):
            raise WeightFileError(f"{source}: the weights have {config['num_tags']} tags but the shipped RAM tag "
                                  f"list has {len(names)}: not the RAM 4585-tag model. {fix}")
        with torch.device("meta"):
            model = DAPETagger(config, names, thresholds)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise WeightFileError(f"{source}: the stored architecture is not a RAM tagger ({type(e).__name__}: {e}). "
                              f"{fix}") from e
    expected = model.state_dict()
    extra = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if missing or extra:
        raise WeightFileError(f"{source}: the weights do not fit the tagger: missing {missing[:3]}, unexpected "
                              f"{extra[:3]}. {fix}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise WeightFileError(f"{source}: {key} has shape {tuple(value.shape)} in the file, "
                                  f"{tuple(expected[key].shape)} expected. {fix}")
    model.load_state_dict(state, assign=True)  # the Swin index/mask buffers are built on the CPU already
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@releasing_tensors
def load_dape_tagger(ram_path=None, dape_path=None, converted_path=None, device="cpu", dtype=torch.float32):
    """The DAPE tagger from (``ram_path`` + ``dape_path``) or from ``converted_path``.

    The RAM file (~5.6 GB) is memory-mapped and only the tagging tensors (~0.85 GB fp32) are
    copied; LoRAs are merged in fp32 before the cast to ``dtype``.
    """
    if converted_path is not None:
        if ram_path is not None or dape_path is not None:
            raise WeightFileError("Give either the converted DAPE file or the RAM + DAPE files, not both.")
        state, config = _state_from_converted(converted_path)
        source = quoted_name(os.path.basename(os.fspath(converted_path)))
    else:
        if ram_path is None or dape_path is None:
            raise WeightFileError("DAPE needs both ram_swin_large_14m.pth (RAM) and DAPE.pth (LoRA), "
                                  "or one converted file.")
        state, config = _state_from_official(ram_path, dape_path)
        source = " + ".join(quoted_name(os.path.basename(os.fspath(path))) for path in (ram_path, dape_path))
    return _build(state, config, device, dtype, source)


@releasing_tensors
def convert_dape(ram_path, dape_path, out_path, half=False):
    """Write the tagging tensors with DAPE merged to ``out_path`` (.safetensors; fp16 if ``half``)."""
    check_safetensors_output(out_path)  # before the RAM file (5.6 GB) is read
    state, config = _state_from_official(ram_path, dape_path)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
    meta = {"format": DAPE_FORMAT, "version": "1", "config": json.dumps(config), "dape_merged": "true",
            "dtype": "fp16" if half else "fp32", "source": f"{os.path.basename(os.fspath(ram_path))} + "
            f"{os.path.basename(os.fspath(dape_path))}"}
    write_safetensors(tensors, out_path, metadata=meta)
    return out_path
