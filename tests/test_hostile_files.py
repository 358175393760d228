"""Hostile weight files: a pickle that would run code is refused by every loader and never executed.

Each payload writes a marker file when unpickled. Every loader (SD 2.1 single file and diffusers
folder, OSEDiff, RAM, DAPE, DoSSR, their converted safetensors, and the commands) must raise our
``WeightFileError`` naming the file and saying how to convert it safely, and the marker must never appear.
"""

import os
import pickle

import pytest
import torch

from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.osediff_core.dape import load_dape_tagger
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common.errors import WeightFileError
from comfyui_diffsr.sr_common.sd21 import load_sd21

from conftest import DAPE, DATA, DOSSR_CONFIG, RAM, copy_tiny_sd21, copy_tiny_sd21_configs

TINY_SD21 = os.path.join(DATA, "osediff", "tiny_sd21")
IMAGE = os.path.join(DATA, "dossr", "lr_w32h16.png")


class _System:
    """Unpickling runs ``os.system(command)``."""

    def __init__(self, marker):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    """Unpickling runs ``exec(source)``."""

    def __init__(self, marker):
        self.source = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.source,))


class _Open:
    """Unpickling runs ``open(marker, 'w')``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _zip_system(path, obj):
    torch.save(obj, path)


def _legacy_exec(path, obj):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _raw_open(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# (payload class, how it is written): torch zip format, legacy torch format, a bare pickle
PAYLOADS = {"zip-os.system": (_System, _zip_system), "legacy-exec": (_Exec, _legacy_exec),
            "pickle-open": (_Open, _raw_open)}


def _sd_like(evil):
    return {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2), "evil": evil}}


def _osediff_like(evil):
    return {"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {"conv_in.base_layer.weight": evil},
            "state_dict_vae": {}}


def _ram_like(evil):
    return {"model": {"visual_encoder.patch_embed.proj.weight": evil, "label_embed": torch.zeros(2, 2)}}


def _dape_like(evil):
    return {"visual_encoder.layers.0.blocks.0.attn.qkv.lora_A": evil}


def _dossr_like(evil):
    return {"state_dict": {"control_model.zero_convs.0.0.weight": evil, "cond_encoder.encoder.conv_in.weight": evil}}


def _tiny_folder(root):
    return copy_tiny_sd21(os.path.join(root, "tiny_sd21"))


def _diffusers_with_bin(part, filename):
    """A diffusers folder whose ``part`` has only a pickled ``.bin`` (the evil file) instead of safetensors."""
    def make(tmp_path, evil_name):
        folder = _tiny_folder(str(tmp_path))
        for name in os.listdir(os.path.join(folder, part)):
            if name.endswith(".safetensors"):
                os.remove(os.path.join(folder, part, name))
        return folder, os.path.join(folder, part, filename)
    return make


def _single(suffix):
    def make(tmp_path, evil_name):
        return None, str(tmp_path / f"{evil_name}{suffix}")
    return make


def _single_sd21(suffix):
    """A single SD 2.1 file (the evil file) beside the tiny configs, its ``config_dir``."""
    def make(tmp_path, evil_name):
        return copy_tiny_sd21_configs(tmp_path / "configs"), str(tmp_path / f"{evil_name}{suffix}")
    return make


# loader id: (where the evil file goes, a plausible layout around the payload, how the loader is called)
LOADERS = {
    "sd21-single-ckpt": (_single_sd21(".ckpt"), _sd_like, lambda p, f: load_sd21(p, config_dir=f)),
    "sd21-single-safetensors": (_single_sd21(".safetensors"), _sd_like, lambda p, f: load_sd21(p, config_dir=f)),
    "sd21-diffusers-unet-bin": (_diffusers_with_bin("unet", "diffusion_pytorch_model.bin"), _sd_like,
                                lambda p, f: load_sd21(f)),
    "sd21-diffusers-vae-bin": (_diffusers_with_bin("vae", "diffusion_pytorch_model.bin"), _sd_like,
                               lambda p, f: load_sd21(f)),
    "sd21-diffusers-text-encoder-bin": (_diffusers_with_bin("text_encoder", "pytorch_model.bin"), _sd_like,
                                        lambda p, f: load_sd21(f)),
    "osediff-pkl": (_single(".pkl"), _osediff_like, lambda p, f: read_osediff(p)),
    "osediff-safetensors": (_single(".safetensors"), _osediff_like, lambda p, f: read_osediff(p)),
    "ram-pth": (_single(".pth"), _ram_like, lambda p, f: load_dape_tagger(p, DAPE)),
    "dape-pth": (_single(".pth"), _dape_like, lambda p, f: load_dape_tagger(RAM, p)),
    "dape-converted-safetensors": (_single(".safetensors"), _dape_like,
                                   lambda p, f: load_dape_tagger(converted_path=p)),
    "dossr-ckpt": (_single(".ckpt"), _dossr_like, lambda p, f: load_dossr(p, config=DOSSR_CONFIG)),
    "dossr-converted-safetensors": (_single(".safetensors"), _dossr_like,
                                    lambda p, f: load_dossr(p, base=TINY_SD21)),
}


def _assert_refused_safely(call, path, marker):
    with pytest.raises(WeightFileError) as info:
        call()
    message = str(info.value)
    assert os.path.basename(path) in message, message
    assert "could run code" in message, message
    # how to convert safely: once, in a separate Python, to safetensors
    assert "weights_only=False" in message and "safetensors.torch.save_file" in message, message
    assert not os.path.exists(marker), "the pickle ran code"


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_a_code_running_pickle(tmp_path, loader, payload):
    place, layout, call = LOADERS[loader]
    evil_cls, write = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    folder, path = place(tmp_path, "evil")
    write(path, layout(evil_cls(marker)))
    _assert_refused_safely(lambda: call(path, folder), path, marker)


def _cli_cases(evil):
    from comfyui_diffsr.cli import convert, dape, dossr, osediff

    pkl = os.path.join(DATA, "osediff", "osediff_tiny.pkl")
    return {
        "osediff --weights": (osediff.main, [IMAGE, "-o", "{out}", "--base", TINY_SD21, "--weights", evil]),
        "osediff --base": (osediff.main, [IMAGE, "-o", "{out}", "--base", evil, "--weights", pkl]),
        "osediff --dape": (osediff.main, [IMAGE, "-o", "{out}", "--base", "{folder}", "--weights", pkl, "--ram", RAM,
                                          "--dape", evil, "--process-size", "0"]),
        "dossr --weights": (dossr.main, [IMAGE, "-o", "{out}", "--weights", evil, "--config", DOSSR_CONFIG]),
        "dossr --prompt-embeds": (dossr.main, [IMAGE, "-o", "{out}", "--weights", "x.ckpt", "--prompt-embeds", evil]),
        "dape --ram": (dape.main, [IMAGE, "--ram", evil, "--dape", DAPE]),
        "convert osediff": (convert.main, ["osediff", evil, "{out}.safetensors"]),
        "convert dape": (convert.main, ["dape", "--ram", RAM, "--dape", evil, "-o", "{out}.safetensors"]),
        "convert dossr": (convert.main, ["dossr", evil, "{out}.safetensors"]),
    }


@pytest.mark.parametrize("case", list(_cli_cases("x")))
def test_commands_refuse_a_code_running_pickle(tmp_path, capsys, case):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.ckpt")
    if case == "dossr --prompt-embeds":
        evil = str(tmp_path / "evil.safetensors")
    _zip_system(evil, {"x": _System(marker)})
    main, args = _cli_cases(evil)[case]
    folder = _tiny_folder(str(tmp_path)) if "{folder}" in args else ""
    args = [a.format(out=tmp_path / "out", folder=folder) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "evil." in err and "could run code" in err and "safetensors.torch.save_file" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_payloads_are_live(tmp_path, payload):
    """Control: each payload does write its marker when unpickled without the safety net."""
    evil_cls, write = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    write(path, {"x": evil_cls(marker)})
    if payload == "pickle-open":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()
