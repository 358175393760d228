import contextlib
import dataclasses
import functools
import glob
import http.server
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from comfyui_diffsr.sr_common.download import file_digests
from comfyui_diffsr.sr_common.known_files import UNET_PREFIX
from comfyui_diffsr.sr_common.sd21 import cpu_computes_float16
from fixture_weights import checkpoint_bytes, exclusive_lock, make_checkpoint, replace_file, same_bytes

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "sr_common", "configs", "sd21_base", "tokenizer")
STUBS = os.path.join(os.path.dirname(__file__), "comfy_stubs")
MAKING_LOCK = os.path.join(DATA, "making.lock")  # held while a session makes the files the tests read
PACKAGED = ("__init__.py", "__main__.py", "cli", "dossr_core", "nodes", "osediff_core", "sr_common")


def python_sources(tops=PACKAGED):
    """The Python files of ``tops`` (files and folders of the checkout; by default the package's), relative to the
    checkout."""
    for top in tops:
        if top.endswith(".py"):
            yield top
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.relpath(os.path.join(folder, n), ROOT) for n in sorted(names) if n.endswith(".py"))


def pytest_sessionstart(session):
    """Stop when the installed ``comfyui_diffsr`` is an older copy of this checkout (``tools/run_tests.sh`` installs
    it, not editable, so that packaging is tested too): the tests would pass or fail on code that is not here. Then
    make the tiny checkpoints from their recipes (tests/fixture_weights.py) and the tiny SD 2.1 folder's weight files
    (``make_tiny_sd21_weights``), one session at a time (``MAKING_LOCK``): a session started with another in this
    checkout finds them made (on Windows, a rename over a file that the other session has open fails)."""
    import comfyui_diffsr

    installed = os.path.dirname(os.path.abspath(comfyui_diffsr.__file__))
    if os.path.realpath(installed) != os.path.realpath(ROOT):
        differing = [rel for rel in python_sources()
                     if not same_bytes(os.path.join(installed, rel), os.path.join(ROOT, rel))]
        if differing:
            pytest.exit(f"The installed comfyui_diffsr ({installed}) is not this checkout: {len(differing)} file(s) "
                        f"differ (e.g. {differing[0]}). Run `bash tools/run_tests.sh`, which reinstalls it.",
                        returncode=2)
    try:
        with exclusive_lock(MAKING_LOCK):
            for recipe in sorted(glob.glob(os.path.join(DATA, "*", "*.recipe.json"))):
                make_checkpoint(recipe)
            make_tiny_sd21_weights()
    except RuntimeError as e:
        pytest.exit(str(e), returncode=2)


TINY_SD21 = os.path.join(DATA, "osediff", "tiny_sd21")
# the tiny official-layout files the fixtures were made with
SINGLE = os.path.join(DATA, "osediff", "tiny_sd21_single.safetensors")
OSEDIFF = os.path.join(DATA, "osediff", "osediff_tiny.pkl")
RAM = os.path.join(DATA, "dape", "ram_tiny.pth")
DAPE = os.path.join(DATA, "dape", "dape_tiny.pth")
DOSSR = os.path.join(DATA, "dossr", "dossr_tiny.ckpt")
DOSSR_CONFIG = os.path.join(DATA, "dossr", "tiny_cldm.yaml")


def make_tiny_sd21_weights():
    """The weight files of the tiny SD 2.1 diffusers folder (tests/data/osediff/tiny_sd21), where missing. They are
    not stored: the fixture script wrote them with the same tensors as ``tiny_sd21_single.safetensors`` (checked
    there with diffusers' LDM converters), so they are made again from that file by ``load_sd21`` and must be,
    byte for byte, the files it wrote (their SHA-256: ``tiny_sd21/weights_sha256.json``)."""
    from comfyui_diffsr.sr_common.sd21 import load_sd21

    with open(os.path.join(TINY_SD21, "weights_sha256.json"), encoding="utf-8") as f:
        expected = {os.path.join(TINY_SD21, name): digest for name, digest in json.load(f).items()}
    if all(os.path.exists(path) and file_digests(path)[0] == digest for path, digest in expected.items()):
        return
    with warnings.catch_warnings():  # no tokenizer stored in the folder: the pack's, which is the same
        warnings.simplefilter("ignore")
        sd = load_sd21(os.path.join(DATA, "osediff", "tiny_sd21_single.safetensors"), config_dir=TINY_SD21)
    for path, digest in expected.items():
        part = os.path.basename(os.path.dirname(path))
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in getattr(sd, part).state_dict().items()}
        if part == "text_encoder":  # the names and the position_ids of the transformers that wrote it (4.28)
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
            positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
            state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
        replace_file(path, checkpoint_bytes(state, "safetensors", {"format": "pt"}))
        if file_digests(path)[0] != digest:
            raise RuntimeError(f"{os.path.relpath(path, DATA)}, made from tiny_sd21_single.safetensors by load_sd21, "
                               "is not the file the fixture script wrote (weights_sha256.json): the single-file "
                               "loader's result has changed.")


@contextlib.contextmanager
def host_stand_ins(pack_module, models=None):
    """Within the block, ``comfy``, ``comfy_api``, ``folder_paths`` and ``nodes`` import the stand-ins of
    tests/comfy_stubs, as ComfyUI's root on its ``sys.path`` gives the real ones, and models/ is ``models``; after it,
    the stand-ins and the pack imported under the module name ``pack_module`` are forgotten."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(STUBS)
        if models is not None:
            patch.setenv("DIFFSR_TEST_MODELS", str(models))
        try:
            yield
        finally:
            for name in [n for n in sys.modules if n.startswith((pack_module, "comfy", "folder_paths", "nodes"))
                         and not n.startswith("comfyui_diffsr")]:
                del sys.modules[name]


@contextlib.contextmanager
def fifo(path, let_go_after=None):
    """A FIFO (named pipe) at ``path`` within the block. A reader opening it waits for a writer; at the end, one still
    waiting is let go (a writer opens it and closes at once: the reader reads nothing), so that a test that found a
    read waiting leaves no thread behind it. ``let_go_after``: seconds after which another process lets a waiting
    reader go, for a reader that waits holding the interpreter lock (safetensors' ``safe_open``), which no thread of
    this process could let go. Skips the test on Windows, whose files are never FIFOs."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs among Windows' files")
    os.mkfifo(path)
    writer = None
    if let_go_after is not None:
        writer = subprocess.Popen([sys.executable, "-c", "import os, sys, time; time.sleep(float(sys.argv[2])); "
                                   "os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))",
                                   str(path), str(let_go_after)], stderr=subprocess.DEVNULL)
    try:
        yield str(path)
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        with contextlib.suppress(OSError):  # ENXIO: no reader waits
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def warning_options(interpreter_options, ini_filters, command_line_filters, mark_filters):
    """PYTHONWARNINGS for a child process that filters warnings as the test does: the interpreter's own options
    (``sys.warnoptions``), then the filters pytest adds (its ``filterwarnings`` ini option, its ``-W`` options and the
    test's ``filterwarnings`` marks), in the order they are applied: the last one applied takes precedence in both.
    Python reads a message or module of PYTHONWARNINGS as text (a module whole), as pytest reads its ``-W`` options;
    pytest reads those of its ini option and marks as regular expressions. Python splits the variable at commas: a
    filter whose meaning would change in the child is refused (ValueError), not given changed."""
    for option in (*ini_filters, *mark_filters):
        _, message, _, module, _ = (part.strip() for part in (option.split(":") + [""] * 4)[:5])
        if any(c in message for c in ".^$*+?{}[]\\|()") or module:
            raise ValueError(f"the warning filter {option!r} would mean another in a child process (Python reads its "
                             "message and module as text, pytest as a regular expression)")
    options = [*interpreter_options, *ini_filters, *command_line_filters, *mark_filters]
    if any("," in option for option in options):
        raise ValueError(f"PYTHONWARNINGS cannot give a child a warning filter holding a comma: {options}")
    return ",".join(options)


@pytest.fixture
def child_env(request):
    """``child_env(**variables)``: this process's environment with ``variables`` set and PYTHONWARNINGS the warning
    filters this test runs with (``warning_options``), for a Python child process, so that a deprecated call on the
    command line's path fails under ``pytest -W error::DeprecationWarning`` as it would in the test's own process.
    pytest's default of showing every DeprecationWarning is not passed on: a child has no summary to collect them."""
    config, pytest_filters = request.config, ([], [], [])
    if config.pluginmanager.has_plugin("warnings"):  # ``-p no:warnings`` applies none of them
        pytest_filters = (config.getini("filterwarnings"), config.known_args_namespace.pythonwarnings or [],
                          [arg for mark in request.node.iter_markers("filterwarnings") for arg in mark.args])
    options = warning_options(sys.warnoptions, *pytest_filters)

    def environment(**variables):
        env = {name: value for name, value in os.environ.items() if name != "PYTHONWARNINGS"}
        return {**env, **variables, **({"PYTHONWARNINGS": options} if options else {})}
    return environment


def sparse_file(path, size=2 << 30, head=b""):
    """A file of ``size`` bytes (2 GiB), ``head`` then zeros, taking no disk: all but ``head`` is a hole. Skips the
    test on Windows, where the file would take its size (NTFS makes no holes unless asked)."""
    if os.name == "nt":
        pytest.skip("NTFS files are not sparse by default")
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return str(path)


def outcome_within(call, seconds=30):
    """What ``call()`` gave, ("returned", value) or ("raised", exception), run in a thread; the test fails where it is
    still running after ``seconds`` (waiting on a FIFO, say), as a test of the code before would hang for ever."""
    outcome = []

    def run():
        try:
            outcome.append(("returned", call()))
        except BaseException as e:  # the test looks at it
            outcome.append(("raised", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def tf32_flags():
    """PyTorch's TF32 flags for cuDNN convolutions and CUDA matrix products, through the API it has."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        return cudnn.conv.fp32_precision, matmul.fp32_precision
    return cudnn.allow_tf32, matmul.allow_tf32


IEEE_FLOAT32 = (("ieee", "ieee"), (False, False))  # tf32_flags() where float32 is computed as IEEE float32


class LocalServer(http.server.ThreadingHTTPServer):
    """A test server on 127.0.0.1, a thread per request, that does not print a client going away. The tests stop
    downloads (Ctrl-C, a bad hash): socketserver's ``handle_error`` printed the answering thread's ConnectionError
    from that thread at a moment load decided, into the stderr a test then compared (1 run in 10 with two busy
    processes on 2 cores), and, printed while pytest formatted that failure, made two threads parse source with
    ``ast`` at once, which CPython before 3.11.8 (gh-106905) can report as ``SystemError: AST constructor recursion
    depth mismatch``. Any other error of an answer is kept in ``errors`` (``serving`` raises it). Its answering
    threads are waited for on ``server_close`` (not daemons, as ``ThreadingHTTPServer``'s are)."""

    daemon_threads = False

    def __init__(self, handler, tls=None):
        super().__init__(("127.0.0.1", 0), handler)
        self.errors, self.scheme = [], "http" if tls is None else "https"
        if tls is not None:  # an ssl.SSLContext: HTTPS with its certificate
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            self.errors.append(error)

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def serving(handler, tls=None):
    """Within the block, a ``LocalServer`` answers with ``handler`` (yielded; over HTTPS with ``tls``, an
    ``ssl.SSLContext``); leaving, it stops and waits for the threads still answering (``server_close``), then raises
    the first error of an answer that was not a client going away. ``shutdown`` returns at the serving loop's next
    poll: every 10 ms, not socketserver's 0.5 s, which every test that served paid once."""
    server = LocalServer(handler, tls)
    threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.01), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
    if server.errors:
        raise server.errors[0]


@contextlib.contextmanager
def official_files_served(files, official, served, *, with_length=True):
    """Within the block, 127.0.0.1 serves ``files`` ({``official`` key: local file}) from the folder ``served`` under
    their official names, and ``official`` (``sr_common.download.OFFICIAL`` as the caller imported it) points at
    them, each pinned by the hash its real source is pinned by (SHA-256 or git blob id) but of the served file.
    ``with_length=False``: a server that does not say the size (HTTP/1.0, ends at close). Yields the list of the
    paths requested."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_header(self, keyword, value):
            if with_length or keyword.lower() != "content-length":
                super().send_header(keyword, value)

        def end_headers(self):
            requests.append(self.path)
            super().end_headers()

    served.mkdir(exist_ok=True)
    with serving(functools.partial(Handler, directory=str(served))) as server, pytest.MonkeyPatch.context() as patch:
        for key, path in files.items():
            source = official[key]
            shutil.copy(path, served / source.filename)
            sha256, blob = file_digests(path)
            pins = {"sha256": sha256 if source.sha256 else "", "git_blob": blob if source.git_blob else ""}
            patch.setitem(official, key, dataclasses.replace(source, url=f"{server.url}/{source.filename}", **pins))
        yield requests


RIVAL_OUTPUT = b"the other run's"  # what ``folder_run_with_a_rival`` writes as the other run's out/b.png


def folder_run_with_a_rival(tmp_path, monkeypatch, image, module, name):
    """(input folder, output folder) of a folder run that another run shares: in/ holds a.png and b.png (copies of
    ``image``), out/ is empty, and ``module.name`` (the command's upscaling function) is wrapped so that, as each image
    starts, the other run writes out/b.png (``RIVAL_OUTPUT``), after this run planned its outputs."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    for file_name in ("a.png", "b.png"):
        shutil.copy(image, folder / file_name)
    real = getattr(module, name)

    def other_run_writes_b(*args, **kwargs):
        (out / "b.png").write_bytes(RIVAL_OUTPUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, other_run_writes_b)
    return folder, out


def copy_tiny_sd21(dest):
    """The tiny SD 2.1 diffusers folder (its weight files made at session start: ``make_tiny_sd21_weights``) copied
    to ``dest`` with the tokenizer the pack ships (identical files, stored once). Returns ``dest`` as a string."""
    shutil.copytree(TINY_SD21, dest)
    if not os.path.isdir(os.path.join(dest, "tokenizer")):
        shutil.copytree(TOKENIZER, os.path.join(dest, "tokenizer"))
    return str(dest)


def copy_tiny_sd21_configs(dest):
    """The tiny SD 2.1 folder's configs, without its weights, copied to ``dest`` with the tokenizer the pack ships: a
    single file's ``config_dir`` (the stored folder has no tokenizer, and loads with a warning that the shipped one is
    used). Returns ``dest`` as a string."""
    shutil.copytree(TINY_SD21, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.copytree(TOKENIZER, os.path.join(dest, "tokenizer"))
    return str(dest)


def hugging_face_cache(root, folder, revision="5ede9e4bf3e3fd1cb0ef2f7a3fff13ee514fdf06"):
    """``folder`` as huggingface_hub caches it: ``models--org--name/blobs/<hash>`` holding the files,
    ``snapshots/<revision>/<path>`` relative links to them, ``refs/main`` naming the revision."""
    cache = os.path.join(root, "models--sd2-community--stable-diffusion-2-1-base")
    os.makedirs(os.path.join(cache, "blobs"))
    os.makedirs(os.path.join(cache, "refs"))
    with open(os.path.join(cache, "refs", "main"), "w") as f:
        f.write(revision)
    snapshot = os.path.join(cache, "snapshots", revision)
    for number, (parent, _, names) in enumerate(os.walk(folder)):
        for index, name in enumerate(names):
            blob = os.path.join(cache, "blobs", f"{number:04d}{index:04d}")
            os.rename(os.path.join(parent, name), blob)
            link = os.path.join(snapshot, os.path.relpath(parent, folder), name)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return cache, snapshot


# for the tests that run float16 on the CPU (they stand in for a GPU's float16 there)
cpu_float16 = pytest.mark.skipif(not cpu_computes_float16(),
                                 reason="this PyTorch computes no float16 convolution or layer norm on the CPU")


def half_channels_last(*modules):
    """``modules`` in float16 with their 4-D weights channels-last, for a float16 test on the CPU: PyTorch's CPU
    float16 convolution is fast in that layout alone (a 3×3 one of 128 channels on 128² took 14.6 s contiguous,
    0.15 s channels-last, on this 2-core AMD EPYC with torch 2.13.0; float32 0.02 s either way). Returns the first."""
    for module in modules:
        module.to(dtype=torch.float16, memory_format=torch.channels_last)
    return modules[0]


def psnr(a, b, peak=1.0):
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


def sd15_layout(sd):
    """An SD 2.x LDM state dict in SD 1.x's layout: its text encoder in transformers' keys, its UNet's transformers
    projecting with 1×1 convolutions (what tells SD 1.x; SD 2.x projects with linear layers)."""
    return {k.replace("cond_stage_model.model.", "cond_stage_model.transformer.text_model."):
            v[:, :, None, None] if k.startswith(UNET_PREFIX) and k.endswith((".proj_in.weight", ".proj_out.weight"))
            else v for k, v in sd.items()}


def fixture_noise(d, steps):
    """The random draws stored in a DoSSR fixture, as a ``noise`` dict for the sampler and the pipeline."""
    return {"posterior": d["noise_posterior"], "init": d["noise_init"],
            **{f"step_{k}": d[f"noise_step_{k}"] for k in range(steps)}}


@pytest.fixture
def every_fast_path(monkeypatch):
    """Lifts the Winograd rule (every stride-1 3×3 convolution not taken as one product runs by F(2×2, 3×3)) and sends
    every product through oneDNN's matmul whatever this CPU's vendor (Intel's keep MKL by default). Returns the calls
    of each: {"winograd": [...], "products": [...]}."""
    from comfyui_diffsr.sr_common import fast_modules

    calls = {"winograd": [], "products": []}
    winograd, onednn = fast_modules.winograd_conv3x3, torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(fast_modules, "WINOGRAD_MIN_WIDTH", 0)
    monkeypatch.setattr(fast_modules, "WINOGRAD_MAX_ELEMENTS", 2**40)
    monkeypatch.setattr(fast_modules, "winograd_conv3x3", lambda *a: calls["winograd"].append(1) or winograd(*a))
    monkeypatch.setattr(fast_modules, "_onednn_linear_op",
                        lambda: lambda *a: calls["products"].append(1) or onednn(*a))
    return calls


@pytest.fixture(scope="session")
def tiny_unet_vae():
    """A small SD 2.1-shaped UNet and VAE with random weights, built in the test (no files); every GroupNorm has 2 or
    more channels per group (one channel per group is an instance norm, blind to a per-channel shift or scale)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(64, 64, 128, 128), layers_per_block=1, cross_attention_dim=16,
                                attention_head_dim=[1, 1, 1, 1], use_linear_projection=True,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    vae = AutoencoderKL(block_out_channels=(64, 64, 128, 128), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    return unet, vae


# the float64 tensors a run may form where the device has none: the DoSSR schedule's 1-D tables over the training
# timesteps (β, ᾱ, η; 1000 and 500 long), formed on the CPU and read as Python numbers
CPU_SIDE_FLOAT64_LENGTHS = (1000, 500)


class FailOnFloat64(TorchDispatchMode):
    """Fails on every op that takes or gives a float64 tensor other than a number (0-dim) or a 1-D table of
    ``CPU_SIDE_FLOAT64_LENGTHS``: on Apple's MPS each would raise. ``found`` keeps them all (in case a caller
    swallows the failure)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in pytree.tree_flatten((args, kwargs, out))[0]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() > 0
                    and not (t.dim() == 1 and len(t) in CPU_SIDE_FLOAT64_LENGTHS)):
                self.found.append(f"{func} on a float64 tensor of shape {tuple(t.shape)}")
                raise AssertionError(self.found[-1])
        return out


@contextlib.contextmanager
def cpu_without_float64(*models, package="comfyui_diffsr"):
    """Within the block the CPU is taken for a device without float64 (Apple's MPS): ``widest_float`` of ``package``
    (the pack as imported under that name) is float32 there, and an op on a float64 tensor fails (``FailOnFloat64``).
    The upsamplers of the ``models``' networks fold their kernels again in the block and after it, as after a move to a
    device and back."""
    devices, fast_modules = (importlib.import_module(f"{package}.sr_common.{name}") for name in ("devices",
                                                                                                "fast_modules"))
    networks = [network for model in models for network in model.modules()]
    guard = FailOnFloat64()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devices, "FLOAT64_DEVICE_TYPES", tuple(t for t in devices.FLOAT64_DEVICE_TYPES if t != "cpu"))
        for network in networks:
            fast_modules.forget_folded_kernels(network)
        try:
            with guard:
                yield
        finally:
            for network in networks:
                fast_modules.forget_folded_kernels(network)
    assert not guard.found, guard.found[0]


class MadeTensors(torch.overrides.TorchFunctionMode):
    """Weak references to every tensor a torch function returns while the mode is on; from the ``fail_at``-th call
    on, ``failure()`` is called first (it raises, or sets an interrupt that the run's next cancel check raises), at
    a call made while the code ``within`` runs only when given. Never in the switch of grad mode, which allocates
    nothing: a ``no_grad`` block's exit restores the mode with it, and failing there left grad off for the tests
    after."""

    def __init__(self, failure=None, fail_at=None, within=None):
        super().__init__()
        self.made, self.calls, self.failure, self.fail_at, self.within = [], 0, failure, fail_at, within

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if (self.failure is not None and self.calls >= self.fail_at and func is not torch._C._set_grad_enabled
                and (self.within is None or running(self.within, sys._getframe(1)))):
            self.failure()
        out = func(*args, **(kwargs or {}))
        self.made += [weakref.ref(t) for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        return out

    def alive(self):
        return [t for t in (ref() for ref in self.made) if t is not None]


def running(code, frame):
    """Whether ``code`` runs in ``frame`` or in a frame that called it."""
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


class RunningClosures(torch.overrides.TorchFunctionMode):
    """``found``: the code of every closure (a function with free variables) of the files in ``folder`` that is
    running when a torch function is called while the mode is on, in the order found."""

    def __init__(self, folder):
        super().__init__()
        self.folder, self.found = os.path.join(folder, ""), {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None:
            code, frame = frame.f_code, frame.f_back
            if code.co_freevars and code not in self.found and code.co_filename.startswith(self.folder):
                self.found[code] = None
        return func(*args, **(kwargs or {}))


def tensors_a_failure_keeps(run, failure, raised, within=None):
    """(shapes, error): ``run()`` once whole, then again with ``failure()`` called from its middle torch call on, or
    from its first one made while the code ``within`` runs (``MadeTensors``), which must raise ``raised``; the
    shapes of the tensors that failed run made which are alive after it, without a garbage collection, less those
    the whole run left alive (the models' own: a cast to their dtype, a cached prompt), and the error, kept as a
    host (ComfyUI, Jupyter) keeps it."""
    with MadeTensors() as whole:
        out = run()
    del out
    kept = {id(t): t for t in whole.alive()}
    grad_enabled = torch.is_grad_enabled()
    with (MadeTensors(failure, fail_at=whole.calls // 2 if within is None else 1, within=within) as failing,
          pytest.raises(raised) as error):
        run()
    assert torch.is_grad_enabled() == grad_enabled  # the failed run's blocks put the mode back
    assert within is not None or len(failing.made) > 10  # half way
    return [tuple(t.shape) for t in failing.alive() if id(t) not in kept], error


def tensors_failures_in_closures_keep(run, failure, raised, folder):
    """{closure: shapes}: ``run()`` once whole, then again for each closure of ``folder`` it ran
    (``RunningClosures``), with ``failure()`` called from the first torch call made while that closure runs, which
    must raise ``raised``; the shapes of the tensors alive after each failure, as ``tensors_a_failure_keeps``."""
    with MadeTensors() as whole, RunningClosures(folder) as closures:
        out = run()
    del out
    kept, found = {id(t): t for t in whole.alive()}, {}
    for code in closures.found:
        with MadeTensors(failure, fail_at=1, within=code) as failing, pytest.raises(raised):
            run()
        assert torch.is_grad_enabled(), code  # the failed run's blocks put the mode back
        name = f"{code.co_name} ({os.path.basename(code.co_filename)}, line {code.co_firstlineno})"
        found[name] = [tuple(t.shape) for t in failing.alive() if id(t) not in kept]
    return found
