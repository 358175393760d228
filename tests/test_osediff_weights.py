"""OSEDiff weight files: detection, LoRA merge with scale 8/rank, conv_in replacement, conversion."""

import copy
import os

import pytest
import torch

from comfyui_diffsr.osediff_core import weights as W
from comfyui_diffsr.sr_common.errors import WeightFileError


@pytest.fixture()
def ckpt(tiny_unet_vae):
    unet, vae = tiny_unet_vae
    return W.random_osediff_checkpoint(unet, vae, rank=4, std=0.1, seed=1)


def test_official_module_lists(tiny_unet_vae, ckpt):
    unet, vae = tiny_unet_vae
    t = W.official_lora_targets(unet, vae)
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
    ckpt = W.random_osediff_checkpoint(unet, vae, rank=4, std=0.1, seed=2, rank_vae=2)
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
