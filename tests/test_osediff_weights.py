"""OSEDiff weight files: detection, LoRA merge with scale 8/rank, conv_in replacement, conversion."""

import copy
import os

import pytest
import torch

from comfyui_diffsr.osediff_core import weights as W
from comfyui_diffsr.sr_common.errors import WeightFileError
from fixture_weights import official_lora_targets, random_lora_pair, random_osediff_checkpoint


@pytest.fixture()
def ckpt(tiny_unet_vae):
    unet, vae = tiny_unet_vae
    return random_osediff_checkpoint(unet, vae, rank=4, std=0.1, seed=1)


def test_official_module_lists(tiny_unet_vae, ckpt):
    unet, vae = tiny_unet_vae
    t = official_lora_targets(unet, vae)
    assert "conv_in" in t["unet_lora_encoder_modules"] and "conv_out" in t["unet_lora_decoder_modules"]
    assert all(m.startswith("mid_block") for m in t["unet_lora_others_modules"])
    assert not any("time_emb" in m for m in sum((t[k] for k in t if k.startswith("unet")), []))
    assert "quant_conv" in t["vae_lora_encoder_modules"] and "post_quant_conv" not in t["vae_lora_encoder_modules"]
    assert len(set(t["vae_lora_encoder_modules"])) < len(t["vae_lora_encoder_modules"])  # the official duplicates


def test_merge_equals_lora_forward(tiny_unet_vae, ckpt):
    unet, _ = tiny_unet_vae
    merged = W.apply_osediff_unet(copy.deepcopy(unet), ckpt)
    sd = ckpt["state_dict_unet"]
    scale = 8 / 4  # PEFT's default lora_alpha = 8 over rank 4
    # a Linear: y = W x + s·B(A x)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = sd[f"{name}.lora_A.default_encoder.weight"], sd[f"{name}.lora_B.default_encoder.weight"]
    x = torch.randn(3, a.shape[1])
    base = dict(unet.named_modules())[name]
    ref = base(x) + scale * (x @ a.T @ b.T)
    torch.testing.assert_close(dict(merged.named_modules())[name](x), ref, atol=1e-5, rtol=1e-5)
    # a 3×3 conv: y = conv(x, W) + s·conv1x1(conv(x, A), B)
    name = "up_blocks.1.resnets.0.conv1"
    a, b = sd[f"{name}.lora_A.default_decoder.weight"], sd[f"{name}.lora_B.default_decoder.weight"]
    conv = dict(unet.named_modules())[name]
    x = torch.randn(1, conv.in_channels, 8, 8)
    ref = conv(x) + scale * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b)
    torch.testing.assert_close(dict(merged.named_modules())[name](x), ref, atol=1e-4, rtol=1e-4)
    # conv_in: trained base replaced, then its LoRA merged on top
    a, b = sd["conv_in.lora_A.default_encoder.weight"], sd["conv_in.lora_B.default_encoder.weight"]
    expected = sd["conv_in.base_layer.weight"] + scale * W.lora_delta(a, b, 1.0)
    torch.testing.assert_close(merged.conv_in.weight, expected)
    torch.testing.assert_close(merged.conv_in.bias, sd["conv_in.base_layer.bias"])
    # untouched: time embedding
    torch.testing.assert_close(merged.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)


def test_merge_writes_only_new_tensors(tiny_unet_vae, ckpt):
    unet, _ = tiny_unet_vae
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    versions = {k: v._version for k, v in unet.state_dict().items()}
    merged = W.apply_osediff_unet(unet, ckpt)
    for k, v in unet.state_dict().items():  # the given UNet is untouched, not even written back
        assert torch.equal(v, before[k]) and v._version == versions[k], k
    storages = {p.untyped_storage().data_ptr() for p in merged.parameters()}
    assert len(storages) == 1  # one new buffer, nothing shared with the original
    assert storages.isdisjoint(p.untyped_storage().data_ptr() for p in unet.parameters())
    assert merged.conv_in is not unet.conv_in and not torch.equal(merged.conv_in.weight, unet.conv_in.weight)
    torch.testing.assert_close(merged.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)


def test_in_place_merge_equals_the_merged_copy(tiny_unet_vae, ckpt):
    unet, _ = tiny_unet_vae
    merged = W.apply_osediff_unet(unet, ckpt)
    own = copy.deepcopy(unet)
    assert W.apply_osediff_unet(own, ckpt, in_place=True) is own
    for (name, a), b in zip(merged.state_dict().items(), own.state_dict().values()):
        assert torch.equal(a, b), name


def test_merge_of_bf16_weights_matches_float32_merge(tiny_unet_vae, ckpt):
    unet, _ = tiny_unet_vae
    merged32 = W.apply_osediff_unet(unet, ckpt)
    merged16 = W.apply_osediff_unet(copy.deepcopy(unet).to(torch.bfloat16), ckpt)
    for (name, p32), p16 in zip(merged32.named_parameters(), merged16.parameters()):
        assert p16.dtype == torch.bfloat16, name
        torch.testing.assert_close(p16.float(), p32.to(torch.bfloat16).float(), atol=0.02, rtol=0.02)


def test_each_part_is_scaled_by_its_own_rank(tiny_unet_vae):
    """The official file stores rank_unet and rank_vae apart (both 4 in osediff.pkl): each part's LoRA is scaled by
    8 / its own rank (a file with UNet rank 4 and VAE rank 2 here)."""
    unet, vae = tiny_unet_vae
    ckpt = random_osediff_checkpoint(unet, vae, rank=4, std=0.1, seed=2, rank_vae=2)
    sd_vae, sd_unet = ckpt["state_dict_vae"], ckpt["state_dict_unet"]
    assert sd_vae["quant_conv.lora_A.default_encoder.weight"].shape[0] == 2
    enc = W.lq_encoder(vae, ckpt)
    a, b = sd_vae["quant_conv.lora_A.default_encoder.weight"], sd_vae["quant_conv.lora_B.default_encoder.weight"]
    torch.testing.assert_close(enc["quant_conv"].weight, vae.quant_conv.weight + W.lora_delta(a, b, 8 / 2))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = sd_unet[f"{name}.lora_A.default_encoder.weight"], sd_unet[f"{name}.lora_B.default_encoder.weight"]
    merged = dict(W.apply_osediff_unet(unet, ckpt).named_modules())[name]
    torch.testing.assert_close(merged.weight, dict(unet.named_modules())[name].weight + W.lora_delta(a, b, 8 / 4))


def test_vae_lora_only_on_a_copy_of_the_encoder(tiny_unet_vae, ckpt):
    _, vae = tiny_unet_vae
    before = copy.deepcopy(vae.state_dict())
    enc = W.lq_encoder(vae, ckpt)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, before[k])  # the shared VAE is untouched
    assert not torch.equal(enc["quant_conv"].weight, vae.quant_conv.weight)
    assert not torch.equal(enc["encoder"].conv_in.weight, vae.encoder.conv_in.weight)


def test_pkl_and_converted_safetensors_load_the_same(tmp_path, ckpt):
    pkl = tmp_path / "osediff.pkl"
    torch.save(ckpt, pkl)
    official = W.read_osediff(pkl)
    out = W.convert_osediff(pkl, tmp_path / "osediff.safetensors")
    converted = W.read_osediff(out)
    assert converted["rank_unet"] == official["rank_unet"] == 4
    for part in ("state_dict_unet", "state_dict_vae"):
        assert converted[part].keys() == official[part].keys()
        for k in official[part]:
            assert torch.equal(converted[part][k], official[part][k])
    assert converted["vae_lora_encoder_modules"] == official["vae_lora_encoder_modules"]
    sft = out.rename(tmp_path / "osediff.sft")  # the other safetensors suffix ComfyUI lists
    renamed = W.read_osediff(sft)
    assert all(torch.equal(renamed["state_dict_unet"][k], v) for k, v in official["state_dict_unet"].items())


def test_a_peft_lora_for_sd_is_named(tmp_path):
    """An SD LoRA in PEFT's naming (diffusers' ``unet.…lora_A.weight``), the layout nearest OSEDiff's own; the other
    wrong files are in test_known_files."""
    torch.save({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}, tmp_path / "peft_lora.pth")
    with pytest.raises(WeightFileError, match="not an OSEDiff checkpoint.*LoRA for Stable Diffusion.*Load LoRA"):
        W.read_osediff(tmp_path / "peft_lora.pth")


def test_lora_for_another_architecture_is_refused(tiny_unet_vae, ckpt):
    unet, _ = tiny_unet_vae
    bad = copy.deepcopy(ckpt)
    bad["unet_lora_encoder_modules"].append("nonexistent.block")
    bad["state_dict_unet"]["nonexistent.block.lora_A.default_encoder.weight"] = torch.zeros(4, 3)
    bad["state_dict_unet"]["nonexistent.block.lora_B.default_encoder.weight"] = torch.zeros(3, 4)
    with pytest.raises(WeightFileError, match="not SD 2.1-base"):
        W.apply_osediff_unet(copy.deepcopy(unet), bad)


def test_build_consumes_only_a_unet_it_owns(tiny_unet_vae, ckpt):
    from comfyui_diffsr.osediff_core.pipeline import build_osediff
    from comfyui_diffsr.sr_common.sd21 import SD21

    unet, vae = tiny_unet_vae
    text = torch.nn.Linear(1, 1)
    mapped = SD21(unet, vae, text, None)  # as a file mapping: unet_owned False
    assert build_osediff(mapped, ckpt, consume=True).unet is not unet
    own = copy.deepcopy(unet)
    assert build_osediff(SD21(own, vae, text, None, unet_owned=True), ckpt).unet is not own  # not handed over
    assert build_osediff(SD21(own, vae, text, None, unet_owned=True), ckpt, consume=True).unet is own


def test_build_merges_into_a_vae_encoder_it_owns(tiny_unet_vae, ckpt):
    """With ``consume`` and ``vae_owned`` the LoRA goes into the VAE's own encoder (the frozen one is not needed):
    the same LQ encoder as the copy, and no second copy of the encoder."""
    from comfyui_diffsr.osediff_core.pipeline import build_osediff
    from comfyui_diffsr.sr_common.sd21 import SD21

    unet, vae = tiny_unet_vae
    text = torch.nn.Linear(1, 1)
    copied = build_osediff(SD21(unet, copy.deepcopy(vae), text, None, vae_owned=True), ckpt)  # not handed over
    own = copy.deepcopy(vae)
    frozen = {k: v.clone() for k, v in own.encoder.state_dict().items()}
    merged = build_osediff(SD21(unet, own, text, None, vae_owned=True), ckpt, consume=True)
    assert merged.lq_encoder["encoder"] is own.encoder and merged.lq_encoder["quant_conv"] is own.quant_conv
    assert not all(torch.equal(v, own.encoder.state_dict()[k]) for k, v in frozen.items())
    assert copied.lq_encoder["encoder"] is not copied.vae.encoder
    image = torch.rand(1, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(merged.lq_encoder["quant_conv"](merged.lq_encoder["encoder"](image)),
                                   copied.lq_encoder["quant_conv"](copied.lq_encoder["encoder"](image)))


@pytest.mark.parametrize("tokenizer", ["missing", "empty", "zero-byte files"])
def test_base_folder_without_a_tokenizer_uses_the_shipped_one(tmp_path, tokenizer):
    """A diffusers folder whose tokenizer is missing or empty (transformers then builds one without a vocabulary,
    which failed only when the prompt was encoded), or whose vocab.json and merges.txt are 0 bytes (a download
    that did not finish), gets the SD 2.1 tokenizer the pack ships, with a warning."""
    import shutil

    from comfyui_diffsr.sr_common.sd21 import encode_prompt, load_sd21

    from conftest import copy_tiny_sd21

    folder = copy_tiny_sd21(str(tmp_path / "tiny"))
    reference = load_sd21(folder)
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    if tokenizer != "missing":
        os.mkdir(os.path.join(folder, "tokenizer"))
    if tokenizer == "zero-byte files":
        for name in ("vocab.json", "merges.txt"):
            open(os.path.join(folder, "tokenizer", name), "wb").close()
    with pytest.warns(UserWarning, match="no CLIP vocabulary"):
        sd = load_sd21(folder)
    with torch.no_grad():
        assert torch.equal(encode_prompt(sd.text_encoder, sd.tokenizer, ["a cat"]),
                           encode_prompt(reference.text_encoder, reference.tokenizer, ["a cat"]))


def test_converted_file_keeps_each_parts_rank(tmp_path, tiny_unet_vae):
    """A file with UNet rank 4 and VAE rank 2 converts and reads back with both ranks as stored, and the converted
    file's VAE encoder merges as the .pkl's does."""
    unet, vae = tiny_unet_vae
    ckpt = random_osediff_checkpoint(unet, vae, rank=4, std=0.1, seed=3, rank_vae=2)
    torch.save(ckpt, tmp_path / "osediff.pkl")
    converted = W.read_osediff(W.convert_osediff(tmp_path / "osediff.pkl", tmp_path / "osediff.safetensors"))
    assert (converted["rank_unet"], converted["rank_vae"]) == (4, 2)
    torch.testing.assert_close(W.lq_encoder(vae, converted)["quant_conv"].weight,
                               W.lq_encoder(vae, ckpt)["quant_conv"].weight, rtol=0, atol=0)


def _drop(state, prefix):
    """``state`` without the tensors whose names begin with ``prefix``."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(rank_unet=torch.tensor([4, 4])), r"'osediff.pkl' has no usable rank_unet .*download osediff"),
    (lambda c: c.update(rank_vae=torch.empty((), device="meta")),  # torch's own words differ between versions
     r"'osediff.pkl' has no usable rank_vae \((Tensor.item\(\) cannot be called on meta tensors|Could not run "
     r"'aten::_local_scalar_dense' with arguments from the 'Meta' backend[^\n]{0,40})\)\. The file is damaged"),
    (lambda c: c.update(state_dict_vae="encoder.conv_in"), r"'osediff.pkl': state_dict_vae is not a dict of named "
                                                          r"tensors\. The file is damaged; download osediff\.pkl again"),
    (lambda c: c["state_dict_unet"].update({"conv_in.lora_A.default_encoder.weight": torch.zeros(3, 4, 3, 3)}),
     r"rank_unet = 4 but conv_in\.lora_A\.default_encoder\.weight has shape \(3, 4, 3, 3\) \(rank 3\)"),
    (lambda c: c["state_dict_unet"].update({"conv_in.lora_B.default_encoder.weight": torch.zeros(32, 4, 3, 3)}),
     r"rank_unet = 4 but conv_in\.lora_B\.default_encoder\.weight has shape \(32, 4, 3, 3\)"),
    (lambda c: c.update(rank_unet=float("inf")), r"'osediff.pkl' has no usable rank_unet \(cannot convert float "
                                                  r"infinity to integer\)\. The file is damaged; download osediff"),
    (lambda c: [c.pop(key) for key in W.MODULE_LIST_KEYS],
     r"'osediff.pkl' is an incomplete OSEDiff checkpoint: it lacks \['unet_lora_encoder_modules', "
     r"'unet_lora_decoder_modules', 'unet_lora_others_modules', 'vae_lora_encoder_modules'\]\. The file is damaged; "
     r"download osediff\.pkl again"),
    (lambda c: _drop(c["state_dict_unet"], "up_blocks.1."),
     r"^'osediff.pkl' is incomplete: 31 of the 100 modules of unet_lora_decoder_modules have no LoRA in state_dict_unet "
     r"\(up_blocks\.1\.attentions\.0\.proj_in, up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q, "
     r"up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_k, \.\.\.\)\. The file is damaged; download "
     r"osediff\.pkl again\.$"),
    (lambda c: _drop(c["state_dict_vae"], "quant_conv."),
     r"'osediff.pkl' is incomplete: 1 of the 23 modules of vae_lora_encoder_modules have no LoRA in state_dict_vae "
     r"\(quant_conv\)\. The file is damaged"),
    (lambda c: c.update(unet_lora_others_modules="mid_block"),
     r"'osediff.pkl': unet_lora_others_modules is not a list of module names\. The file is damaged"),
], ids=["rank-of-two-values", "rank-on-the-meta-device", "state-not-a-dict", "lora-a-of-lower-rank",
        "lora-b-with-a-3x3-kernel", "rank-infinite", "no-module-lists", "listed-unet-modules-without-lora",
        "listed-vae-module-without-lora", "module-list-not-a-list"])
def test_damaged_parts_are_named(tmp_path, ckpt, change, message):
    """A rank that is no number (two values; a tensor with no data; infinity), a part that is no dict, a lora_A of a
    lower rank than stored (its lora_B has the stored one), a lora_B that is not 1×1, and what the official loader
    (``load_ckpt``: one PEFT adapter per module list, each adapter's LoRA copied from the state dict) cannot load: no
    module lists, listed modules whose LoRA pair is missing (half an up block, the VAE's quant_conv), a list that is
    not one: each refused naming the file, the entry and the fix."""
    bad = copy.deepcopy(ckpt)
    change(bad)
    torch.save(bad, tmp_path / "osediff.pkl")
    with pytest.raises(WeightFileError, match=message):
        W.read_osediff(tmp_path / "osediff.pkl")


def test_lora_pairs_refuses_a_missing_half():
    """``lora_pairs`` called on a checkpoint not checked by ``read_osediff`` names the missing lora_B."""
    ckpt = {"state_dict_vae": {"x.lora_A.default_encoder.weight": torch.zeros(4, 3)}, "rank_vae": 4,
            "vae_lora_encoder_modules": ["x"]}
    with pytest.raises(WeightFileError, match=r"LoRA pair incomplete: x\.lora_B\.default_encoder\.weight is missing"):
        W.lora_pairs(ckpt, "vae")


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in-place"])
@pytest.mark.parametrize("target, a_shape, b_shape, message", [
    ("nonexistent.block", (4, 3), (3, 4), r"targets 'nonexistent\.block', which the base model does not have"),
    ("down_blocks.0", (4, 3), (3, 4), r"targets 'down_blocks\.0', which the base model does not have"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (4, 65), (64, 4),
     r"LoRA for 'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q' has shape \(64, 65\), the base "
     r"weight \(64, 64\)"),
], ids=["no-module", "module-without-weight", "wrong-shape"])
def test_lora_targets_are_checked_in_both_merges(tiny_unet_vae, ckpt, in_place, target, a_shape, b_shape, message):
    """A LoRA for a module the UNet lacks, for a module with no weight, or of another shape is refused as a base that
    is not SD 2.1-base, by the copy and by the in-place merge, before anything is written. (The lists name the
    module: the official code reads no other LoRA. PEFT passes over an entry that matches no module of the base;
    here such an entry means another base.)"""
    unet, _ = tiny_unet_vae
    bad = copy.deepcopy(ckpt)
    bad["unet_lora_encoder_modules"].append(target)
    bad["state_dict_unet"].update({f"{target}.lora_A.default_encoder.weight": torch.zeros(a_shape),
                                   f"{target}.lora_B.default_encoder.weight": torch.zeros(b_shape)})
    own = copy.deepcopy(unet)
    with pytest.raises(WeightFileError, match=message + ".*not SD 2.1-base"):
        W.apply_osediff_unet(own, bad, in_place=in_place)
    for (name, a), b in zip(own.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_in_place_merge_into_channels_last_weights(tiny_unet_vae, ckpt):
    """Weights in channels_last memory format (not contiguous) merge in place to the merged copy's values."""
    unet, _ = tiny_unet_vae
    merged = W.apply_osediff_unet(unet, ckpt)
    own = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    assert not own.conv_in.weight.is_contiguous()
    W.apply_osediff_unet(own, ckpt, in_place=True)
    for (name, a), b in zip(merged.state_dict().items(), own.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_merged_value_is_the_lora_formula(tiny_unet_vae, ckpt):
    """``merged_value`` (the nodes' exact recompute): W + 8/rank · B @ A in float64 for a LoRA target, the weight
    itself for a parameter no LoRA targets."""
    unet, _ = tiny_unet_vae
    _, pairs = W.osediff_unet_changes(unet, ckpt)
    name = "up_blocks.1.resnets.0.conv1"
    a, b = (ckpt["state_dict_unet"][f"{name}.lora_{x}.default_decoder.weight"].double() for x in "AB")
    weight = dict(unet.named_parameters())[f"{name}.weight"].detach()
    expected = weight.double() + 8 / 4 * (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
    torch.testing.assert_close(W.merged_value(f"{name}.weight", weight, pairs).double(), expected,
                               rtol=1e-6, atol=1e-6)
    bias = dict(unet.named_parameters())[f"{name}.bias"].detach()
    assert W.merged_value(f"{name}.bias", bias, pairs) is bias


def _add_pair(ckpt, part, model, name, adapter, seed):
    """Put a random LoRA of ``adapter`` for module ``name`` of ``model`` (the ``part``'s) into ``ckpt``: its (A, B)."""
    pair = random_lora_pair(model.get_submodule(name), name, adapter, ckpt[f"rank_{part}"], 0.1,
                            torch.Generator().manual_seed(seed))
    ckpt[f"state_dict_{part}"].update(pair)
    return tuple(pair.values())


def _saved(tmp_path, ckpt, form):
    """``ckpt`` as read back from an osediff.pkl, or from its conversion with ``form`` "safetensors"."""
    path = tmp_path / "osediff.pkl"
    torch.save(ckpt, path)
    return W.read_osediff(W.convert_osediff(path, tmp_path / "osediff.safetensors") if form == "safetensors" else path)


def _merged_tensors(unet, vae, ckpt):
    """Every tensor of the OSEDiff UNet and LQ encoder made from ``ckpt``."""
    return W.apply_osediff_unet(unet, ckpt).state_dict() | {
        f"vae.{k}": v for k, v in W.lq_encoder(vae, ckpt).state_dict().items()}


@pytest.mark.parametrize("form", ["pkl", "safetensors"])
def test_a_lora_pair_no_list_names_changes_nothing(tmp_path, tiny_unet_vae, ckpt, form):
    """The official ``load_ckpt`` makes a LoRA only for the modules of each adapter's list, so a pair in the state
    dict that its adapter's list does not name is never read: a UNet module no list has (time_embedding.linear_1),
    a listed module under another adapter (conv_out is the decoder's; a default_encoder pair here) and a VAE decoder
    module give the same merged networks as the file without them, read from the .pkl and from its conversion."""
    unet, vae = tiny_unet_vae
    doctored = copy.deepcopy(ckpt)
    _add_pair(doctored, "unet", unet, "time_embedding.linear_1", "default_encoder", 5)
    _add_pair(doctored, "unet", unet, "conv_out", "default_encoder", 6)
    _add_pair(doctored, "vae", vae, "decoder.conv_in", "default_encoder", 7)
    merged, plain = _merged_tensors(unet, vae, _saved(tmp_path, doctored, form)), _merged_tensors(unet, vae, ckpt)
    for name, value in plain.items():
        assert torch.equal(merged[name], value), name


@pytest.mark.parametrize("form", ["pkl", "safetensors"])
def test_a_module_in_two_lists_gets_both_loras(tmp_path, tiny_unet_vae, ckpt, form):
    """A module in the lists of two adapters gets a LoRA of each, and PEFT (0.9, the official pin) adds the LoRAs of
    all active adapters, in forward and in merge: W' = W + s·B1@A1 + s·B2@A2. A Linear and conv_in (on its trained
    base), of default_encoder's list, also in default_others', by each merge: the copy, in place, and the nodes'
    ``merged_value``; from the .pkl and from its conversion."""
    unet, vae = tiny_unet_vae
    doctored = copy.deepcopy(ckpt)
    state, scale = doctored["state_dict_unet"], 8 / 4
    expected = {}
    for name, seed in (("down_blocks.0.attentions.0.proj_in", 8), ("conv_in", 9)):
        doctored["unet_lora_others_modules"].append(name)
        a2, b2 = _add_pair(doctored, "unet", unet, name, "default_others", seed)
        a1, b1 = (state[f"{name}.lora_{x}.default_encoder.weight"] for x in "AB")
        base = state.get(f"{name}.base_layer.weight", unet.get_parameter(f"{name}.weight"))
        expected[f"{name}.weight"] = base + W.lora_delta(a1, b1, scale) + W.lora_delta(a2, b2, scale)
    read = _saved(tmp_path, doctored, form)
    copied = W.apply_osediff_unet(unet, read).state_dict()
    in_place = W.apply_osediff_unet(copy.deepcopy(unet), read, in_place=True).state_dict()
    replace, pairs = W.osediff_unet_changes(unet, read)
    for name, value in expected.items():
        torch.testing.assert_close(copied[name], value, msg=name)
        torch.testing.assert_close(in_place[name], value, msg=name)
        torch.testing.assert_close(W.merged_value(name, replace.get(name, unet.get_parameter(name).detach()), pairs), value,
                                   msg=name)


def test_a_list_entry_names_every_module_ending_in_it(tmp_path, tiny_unet_vae, ckpt):
    """PEFT's target rule: a module is targeted by a list entry it equals or ends with after a dot. An encoder list
    naming "attn2.to_k" where it named the down blocks' attn2.to_k in full gives the encoder's LoRA (from the state
    dict) to every attn2.to_k of the UNet: the up and mid blocks' get it added to their own adapter's."""
    unet, vae = tiny_unet_vae
    doctored = copy.deepcopy(ckpt)
    entries = doctored["unet_lora_encoder_modules"]
    doctored["unet_lora_encoder_modules"] = [m for m in entries if not m.endswith(".attn2.to_k")] + ["attn2.to_k"]
    state, scale = doctored["state_dict_unet"], 8 / 4
    others = [n for n, _ in unet.named_modules() if n.endswith(".attn2.to_k") and not n.startswith("down_blocks.")]
    assert {n.split(".")[0] for n in others} == {"up_blocks", "mid_block"}
    expected = {}
    for seed, name in enumerate(others):
        a2, b2 = _add_pair(doctored, "unet", unet, name, "default_encoder", 10 + seed)
        adapter = "default_decoder" if name.startswith("up_blocks.") else "default_others"
        a1, b1 = (state[f"{name}.lora_{x}.{adapter}.weight"] for x in "AB")
        base = unet.get_parameter(f"{name}.weight")
        expected[f"{name}.weight"] = base + W.lora_delta(a1, b1, scale) + W.lora_delta(a2, b2, scale)
    merged = W.apply_osediff_unet(unet, _saved(tmp_path, doctored, "pkl")).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, msg=name)
    down = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(merged[down], W.apply_osediff_unet(unet, ckpt).state_dict()[down])


def test_two_loras_of_one_module_that_do_not_fit_each_other_are_refused(tiny_unet_vae, ckpt):
    """A module in two adapters' lists whose two LoRAs change weights of different shapes: the file is damaged."""
    unet, _ = tiny_unet_vae
    bad = copy.deepcopy(ckpt)
    bad["unet_lora_others_modules"].append("conv_in")
    bad["state_dict_unet"].update({"conv_in.lora_A.default_others.weight": torch.zeros(4, 5, 3, 3),
                                   "conv_in.lora_B.default_others.weight": torch.zeros(64, 4, 1, 1)})
    with pytest.raises(WeightFileError, match=r"The OSEDiff LoRAs of 'conv_in' \(two module lists name it\) "
                                              r"change weights of shapes \(64, 4, 3, 3\) and \(64, 5, 3, 3\): the "
                                              r"file is damaged; download osediff\.pkl again"):
        W.apply_osediff_unet(unet, bad)


def test_conv_in_of_another_shape_is_refused(tiny_unet_vae, ckpt):
    """A trained conv_in that does not fit the base UNet's names both shapes and the base."""
    unet, _ = tiny_unet_vae
    bad = copy.deepcopy(ckpt)
    bad["state_dict_unet"]["conv_in.base_layer.weight"] = torch.zeros(64, 5, 3, 3)
    with pytest.raises(WeightFileError, match=r"conv_in\.weight has shape \(64, 5, 3, 3\), the base UNet "
                                              r"\(64, 4, 3, 3\): the base is not SD 2\.1-base"):
        W.apply_osediff_unet(unet, bad)


def test_lora_delta_of_half_factors_is_float32():
    """ΔW is computed in float32 whatever the LoRA's dtype (a float16 file): equal to the float64 product."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 3, 3, generator=g).half(), torch.randn(5, 4, 1, 1, generator=g).half()
    delta = W.lora_delta(a, b, 2.0)
    assert delta.dtype == torch.float32 and delta.shape == (5, 6, 3, 3)
    expected = 2.0 * (b.double().flatten(1) @ a.double().flatten(1)).reshape(5, 6, 3, 3)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key, error", [
    ("rank_vae", r"'damaged.safetensors' has damaged OSEDiff metadata \(KeyError: 'rank_vae'\); convert osediff.pkl "
                 r"again with `diffsr convert osediff`"),
    ("unet_lora_others_modules", r"'damaged.safetensors' is an incomplete OSEDiff checkpoint: it lacks "
                                 r"\['unet_lora_others_modules'\]\. The file is damaged")])
def test_converted_file_missing_a_key_of_its_metadata_is_named(tmp_path, ckpt, key, error):
    """A converted file whose metadata lost ``rank_vae`` is refused as damaged OSEDiff metadata, naming the key and
    the fix (a KeyError, not only the ValueError of a rank that is no number); one that lost a module list as the
    .pkl without it is (the official code could not load the file it came from)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.save(ckpt, tmp_path / "osediff.pkl")
    out = W.convert_osediff(tmp_path / "osediff.pkl", tmp_path / "osediff.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != key}
    save_file(load_file(out), tmp_path / "damaged.safetensors", metadata=meta)
    with pytest.raises(WeightFileError, match=error):
        W.read_osediff(tmp_path / "damaged.safetensors")


@pytest.mark.parametrize("grad", [True, False])
def test_merged_copy_keeps_requires_grad(tiny_unet_vae, ckpt, grad):
    """The merged copy's parameters keep the original's ``requires_grad`` (the copy stands in for the module), LoRA
    targets and untouched ones alike; the trained conv_in (a tensor from the file) is left out."""
    unet, _ = tiny_unet_vae
    source = copy.deepcopy(unet).requires_grad_(grad)
    merged = W.apply_osediff_unet(source, ckpt).named_parameters()
    assert {p.requires_grad for name, p in merged if not name.startswith("conv_in.")} == {grad}
