"""Where a checkpoint comes from: a local path, an http(s) URL (downloaded once into torch's
hub cache) or hf-hub:ORG/NAME[@REVISION] (huggingface_hub's cache). Importable without torch,
so the command lines check a source before PyTorch loads."""
import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from checkpoints.formats import check_structure
from common.errors import UserError, first_line
from common.files import atomic_path, sha256_file

logger = logging.getLogger(__name__)

HF_HUB = "hf-hub:"  # hf-hub:ORG/NAME[@REVISION], as timm names Hub weights
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what a Hub model repo holds, preferred first
DOWNLOAD_TIMEOUT = 60.0  # seconds a connect or a read may wait (--download_timeout)
MIN_RATE = 1024  # bytes per second a download must keep up over each --download_timeout window


def is_url(path):
    return bool(re.match(r"^https?://", os.fspath(path), re.I))


def is_remote(path):
    """An http(s) URL or an hf-hub: id: fetched into a cache, then read like a local file."""
    return is_url(path) or os.fspath(path).startswith(HF_HUB)


def hub_parts(ref):
    """(repo id, revision or None) of `hf-hub:ORG/NAME[@REVISION]`, both validated as the Hub
    names them, before any file-system path is built from them: ORG and NAME start and end with a
    letter or digit, hold letters, digits, '-', '_', '.', no '--' or '..', 96 characters at most;
    a revision is a branch, tag or commit name without '..' or '.' segments, a leading '/', a
    backslash or control characters (a revision of '../../x' would walk out of the cache)."""
    repo, at, revision = ref[len(HF_HUB):].partition("@")
    part = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"
    if (not re.fullmatch(f"{part}/{part}", repo) or len(repo) > 96 or "--" in repo or ".." in repo):
        raise UserError(f"{ref}: expected hf-hub:ORG/NAME[@REVISION] with ORG and NAME of letters, digits, "
                        "'-', '_', '.' (starting and ending with a letter or digit, no '--' or '..', "
                        "96 characters at most)")
    if at and (not re.fullmatch(r"[\w.\-/]{1,255}", revision) or revision.startswith("/")
               or any(seg in ("", ".", "..") for seg in revision.split("/"))):
        raise UserError(f"{ref}: a revision is a branch, tag or commit name (letters, digits, '-', '_', "
                        "'.', '/' between parts; no '.' or '..' parts)")
    return repo, revision or None


def check_source(path, what):
    """Refuse a local checkpoint path that is missing or a folder, or a malformed hf-hub: id,
    before any work (URLs are checked when fetched). `what` names it: "--resume x.pth"."""
    path = os.fspath(path)
    if path.startswith(HF_HUB):
        hub_parts(path)
        return
    if is_url(path):
        url_name(path)
        return
    if os.path.isdir(path):
        raise UserError(f"{what}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{what}: no such file (checkpoint not found)")


def url_name(url):
    """The cache file name of an http(s) URL, after checking the URL is well formed (a host, a
    numeric port, a bracketed IPv6 host closed) and its name is a plain file name."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as e:
        raise UserError(f"{url}: malformed URL ({first_line(e)})") from None
    if not parts.hostname:
        raise UserError(f"{url}: malformed URL (no host)")
    name = os.path.basename(parts.path) or "checkpoint.pth"  # as it is: %2F stays three characters
    if name in (".", "..") or "\0" in name:
        raise UserError(f"{url}: the file name {name!r} is not a plain file name")
    return name


def set_download_timeout(seconds):
    """Range-checked, before any work; checkpoint.download reads it."""
    global DOWNLOAD_TIMEOUT
    if not (isinstance(seconds, (int, float)) and 0 < seconds <= 86400):
        raise UserError(f"--download_timeout must be in (0, 86400] seconds, got {seconds}")
    DOWNLOAD_TIMEOUT = float(seconds)


def local_copy(path):
    """`path` itself, or for an http(s) URL its copy in the torch hub cache (downloaded once,
    with a progress bar; a `-<hex>.` hash prefix in the file name is checked), or for an
    hf-hub: id its copy in the Hugging Face cache (hub_copy)."""
    path = os.fspath(path)
    if path.startswith(HF_HUB):
        return hub_copy(path)
    if not is_url(path):
        if re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I):
            raise UserError(f"cannot read {path}: only local paths, http(s) URLs and hf-hub:ORG/NAME are supported")
        return path
    return download(path)


def download(url):
    """The local copy of an http(s) URL: `<torch hub>/checkpoints/<hash of the whole URL>/<name>`,
    downloaded once with a progress bar into a temp name, with a connect / read timeout,
    checked against Content-Length, a `-<hex>.` hash prefix in the name, and the file's own
    structure (a zip's CRCs, a safetensors header) before it is renamed into the cache."""
    import torch  # here: the cache folder and its hash rule are torch.hub's
    name = url_name(url)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    dst = os.path.join(folder, name)
    if os.path.isfile(dst):
        logger.info("Using the cached download %s", dst)
        return dst
    logger.warning("Downloading %s to %s", url, dst)
    match = torch.hub.HASH_REGEX.search(name)
    try:
        with atomic_path(dst) as tmp:
            _fetch(url, tmp, name)
            if match and not sha256_file(tmp).startswith(match.group(1)):
                raise UserError(f"download of {url} is corrupt: its sha256 does not start with "
                                f"{match.group(1)} (the hash in its name)")
            if check_structure(tmp, url) == "pickle":  # no structure to check: read it as every later run would
                from checkpoints.io import load_checkpoint_file
                load_checkpoint_file(tmp)
    except urllib.error.HTTPError as e:
        raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise network_error(url, e) from None
    return dst


def network_error(source, e):
    """The one line for a failure of the network stack (the one place they are worded):
    refused or unreachable hosts, timeouts, broken HTTP (a cut chunked body, a bad status line,
    a header too long), malformed URLs (a port that is not a number, a broken IPv6 host)."""
    reason = getattr(e, "reason", None) or e
    if isinstance(reason, TimeoutError):
        return UserError(f"cannot download {source}: no answer within --download_timeout {DOWNLOAD_TIMEOUT:g} s")
    if isinstance(e, http.client.IncompleteRead):
        return UserError(f"cannot download {source}: the server cut the transfer short; nothing was cached")
    if isinstance(e, http.client.HTTPException) and not isinstance(e, http.client.InvalidURL):
        return UserError(f"cannot download {source}: the server's answer is not valid HTTP "
                         f"({type(e).__name__}: {first_line(e)[:120]})")
    if isinstance(e, (ValueError, http.client.InvalidURL)):
        return UserError(f"cannot download {source}: malformed URL ({first_line(e)[:120]})")
    return UserError(f"cannot download {source}: {first_line(reason)[:200]}")


def _fetch(url, path, name):
    from tqdm import tqdm
    request = urllib.request.Request(url, headers={"User-Agent": "efficient-convnext"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response, open(path, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        got, window, window_got = 0, time.monotonic(), 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
            while chunk := response.read1(1 << 20):  # whatever arrived: the loop keeps the clock
                f.write(chunk)
                got, window_got = got + len(chunk), window_got + len(chunk)
                bar.update(len(chunk))
                elapsed = time.monotonic() - window
                if elapsed >= DOWNLOAD_TIMEOUT:  # a server that drips bytes never trips a read timeout
                    if window_got < MIN_RATE * elapsed:
                        raise UserError(f"download of {url} stalled: {window_got:,} bytes in the last "
                                        f"{elapsed:.0f} s (under {MIN_RATE // 1024} KiB/s over --download_timeout "
                                        f"{DOWNLOAD_TIMEOUT:g} s); nothing was cached")
                    window, window_got = time.monotonic(), 0
    if total is not None and got != total:
        raise UserError(f"download of {url} was cut short ({got:,} of {total:,} bytes); nothing was cached")


def _bytes_under(folder):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files
               if os.path.isfile(os.path.join(root, f)))


def _while_progressing(ref, folder, call):
    """call() in a thread, given up when `folder` (the Hub cache of the repo) has not grown for
    3 x --download_timeout + 30 s: the Hub client retries a server that never answers for
    minutes, whatever its timeouts."""
    import threading
    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = e
    worker = threading.Thread(target=run, daemon=True)  # daemon: a stalled one does not hold the exit
    worker.start()
    limit, seen, since = 3 * DOWNLOAD_TIMEOUT + 30, -1, time.monotonic()
    while worker.is_alive():
        worker.join(1.0)
        size = _bytes_under(folder)
        if size != seen:
            seen, since = size, time.monotonic()
        elif time.monotonic() - since > limit and worker.is_alive():
            raise UserError(f"cannot download {ref}: no progress for {limit:.0f} s (3 x --download_timeout "
                            f"{DOWNLOAD_TIMEOUT:g} s + 30 s); the Hub endpoint does not answer")
    if "error" in result:
        raise result["error"]
    return result["value"]


def hub_copy(ref):
    """The local copy of the weights of `hf-hub:ORG/NAME[@REVISION]` (HUB_WEIGHTS, the first
    the repo has), fetched by huggingface_hub into its cache with a progress bar; its
    settings hold (HF_HUB_OFFLINE=1 reads the cached copy, HF_ENDPOINT, HF_HOME, tokens)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    repo, revision = hub_parts(ref)
    constants.HF_HUB_DOWNLOAD_TIMEOUT = DOWNLOAD_TIMEOUT  # --download_timeout bounds the Hub's reads too
    cache = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    for filename in HUB_WEIGHTS:
        try:
            return _while_progressing(ref, cache, lambda: hf_hub_download(
                repo, filename, revision=revision, etag_timeout=DOWNLOAD_TIMEOUT))
        except RemoteEntryNotFoundError:
            continue
        except LocalEntryNotFoundError:
            raise UserError(f"{ref}: not in the local Hugging Face cache, and the Hub cannot be "
                            "reached (offline, or HF_HUB_OFFLINE=1)") from None
        except GatedRepoError:
            raise UserError(f"{ref} is gated: accept its terms on the Hub and log in (hf auth login)") from None
        except RepositoryNotFoundError:
            raise UserError(f"{ref}: no such model repository on the Hub (or a private one: "
                            "log in with hf auth login)") from None
        except RevisionNotFoundError:
            raise UserError(f"{ref}: the repository has no revision {revision!r}") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (the Hub client's transport raises its own types)
            raise network_error(ref, e) from None
    raise UserError(f"{ref} holds no weights ({' or '.join(HUB_WEIGHTS)})")
