"""Fetch a URL to NAME.part, verify its checksum, rename; retry on server errors and dropped connections."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .io.atomic import write_text

log = logging.getLogger(__name__)

_BLOCK = 1 << 20  # bytes per read
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(Exception):
    """A download that failed or did not verify; str() is one line naming the URL or file and the problem."""


class _Retryable(Exception):
    """A transient failure (server error, dropped connection): worth another attempt."""


@dataclass(frozen=True)
class Dataset:
    """A public data set: where to get it, what format it is in, and its checksum when one is known."""

    url: str
    format: str
    filename: str
    description: str
    sha256: str | None = None
    md5: str | None = None


REGISTRY: dict[str, Dataset] = {
    "10x-MB-20k": Dataset(
        url="http://cf.10xgenomics.com/samples/cell-exp/1.3.0/1M_neurons/1M_neurons_neuron20k.h5",
        format="10x-h5",
        filename="1M_neurons_neuron20k.h5",
        description="10x Genomics, 20,000 E18 mouse brain cells x 27,998 genes (Cell Ranger v2 HDF5, no labels); "
                    "scVAE's MB-20k"),
    "10x-MB": Dataset(
        url="http://cf.10xgenomics.com/samples/cell-exp/1.3.0/1M_neurons/1M_neurons_filtered_gene_bc_matrices_h5.h5",
        format="10x-h5",
        filename="1M_neurons_filtered_gene_bc_matrices_h5.h5",
        description="10x Genomics, 1.3 million E18 mouse brain cells x 27,998 genes (Cell Ranger v2 HDF5, ~4 GB, "
                    "no labels); scVAE's MB"),
}


def check_url(url: str) -> None:
    """Accept only http(s) URLs with a host; anything else (file:, ftp:, ...) is a DownloadError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise DownloadError(f"{url}: only http:// and https:// URLs are accepted")


def _hex(value: str | None, length: int, name: str) -> str | None:
    """A checksum as lower-case hex of the right length, or None."""
    if value is None or value == "":
        return None
    value = value.strip().lower()
    if len(value) != length or any(c not in "0123456789abcdef" for c in value):
        raise DownloadError(f"{name} checksum {value!r} is not {length} hexadecimal digits")
    return value


def recorded_checksum_path(dest: str) -> str:
    """Where the sha256 of a download without a known checksum is recorded (sha256sum format)."""
    return os.fspath(dest) + ".sha256"


def _read_recorded(dest: str) -> str | None:
    """The sha256 recorded by an earlier download of dest, if any."""
    record = recorded_checksum_path(dest)
    if not os.path.isfile(record):
        return None
    with open(record, encoding="utf-8") as handle:
        fields = handle.read().split()
    try:
        value = _hex(fields[0], 64, "recorded sha256") if fields else None
    except DownloadError:
        value = None
    if value is None:
        raise DownloadError(f"{record}: not a sha256 record; delete it to record a fresh one")
    return value


def _write_recorded(dest: str, sha256: str) -> None:
    """Record dest's sha256 next to it, atomically."""
    write_text(recorded_checksum_path(dest), f"{sha256}  {os.path.basename(dest)}\n")


def file_digests(path: str) -> dict[str, str]:
    """sha256 and md5 of a file, read in blocks."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _mismatch(digests: dict[str, str], sha256: str | None, md5: str | None) -> str | None:
    """A description of the first checksum that does not match, or None when all given ones match."""
    for name, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None and digests[name] != expected:
            return f"{name} mismatch: expected {expected}, got {digests[name]}"
    return None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) URLs."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download_once(url: str, part: str, timeout: float) -> dict[str, str]:
    """One attempt: stream url into `part`, hashing on the way; a short or failed transfer is _Retryable."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "scvae-torch"})
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    received, expected = 0, None
    try:
        with opener.open(request, timeout=timeout) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.strip().isdigit() else None
            next_report = 0.1
            while block := response.read(_BLOCK):
                out.write(block)
                sha.update(block)
                md5.update(block)
                received += len(block)
                if expected and received / expected >= next_report:
                    log.info("%s: %d%% of %.1f MB", url, int(100 * received / expected), expected / 1e6)
                    next_report += 0.1
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as err:
        if err.code in _RETRY_STATUS:
            raise _Retryable(f"server answered HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"{url}: server answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # refused, reset, timeout, cut chunk
        reason = getattr(err, "reason", None) or err
        reason = " ".join(str(reason).split()) or type(err).__name__
        raise _Retryable(f"connection failed after {received} bytes: {reason}") from None
    if expected is not None and received != expected:
        raise _Retryable(f"connection closed after {received} of {expected} bytes")
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _remove(path: str) -> None:
    """Delete a file if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fetch(url: str, dest: str, *, sha256: str | None = None, md5: str | None = None, retries: int = 3,
          timeout: float = 60.0, retry_delay: float = 2.0) -> str:
    """Download url to dest via dest.part, verify sha256/md5 (or the recorded sha256), rename; returns the sha256."""
    check_url(url)
    dest = os.fspath(dest)
    sha256, md5 = _hex(sha256, 64, "sha256"), _hex(md5, 32, "md5")
    recorded = _read_recorded(dest)
    if sha256 is None and md5 is None and recorded:
        sha256 = recorded
        log.info("%s: verifying against the sha256 recorded in %s", dest, recorded_checksum_path(dest))
    if os.path.isfile(dest):
        digests = file_digests(dest)
        problem = _mismatch(digests, sha256, md5)
        if problem:
            raise DownloadError(f"{dest}: existing file does not verify ({problem}); delete it to download again")
        if recorded is None and sha256 is None:
            _write_recorded(dest, digests["sha256"])
        log.info("%s: already present and verified", dest)
        return digests["sha256"]
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    attempts = max(0, int(retries)) + 1
    for attempt in range(1, attempts + 1):
        try:
            digests = _download_once(url, part, timeout)
            break
        except _Retryable as err:
            _remove(part)
            if attempt == attempts:
                raise DownloadError(f"{url}: download failed after {attempts} attempts; last error: {err}") from None
            delay = retry_delay * 2 ** (attempt - 1)
            log.warning("%s: attempt %d of %d failed (%s); retrying in %.0f s", url, attempt, attempts, err, delay)
            time.sleep(delay)
        except BaseException:
            _remove(part)
            raise
    problem = _mismatch(digests, sha256, md5)
    if problem:
        _remove(part)
        raise DownloadError(f"{url}: {problem}; the partial download {part} was deleted")
    os.replace(part, dest)
    if sha256 is None:
        _write_recorded(dest, digests["sha256"])
        log.info("%s: no checksum known; recorded sha256 %s in %s", dest, digests["sha256"],
                 recorded_checksum_path(dest))
    return digests["sha256"]


def fetch_dataset(name: str, dest: str, **options) -> str:
    """Download a registered data set by name (see REGISTRY) to dest; returns the sha256."""
    if name not in REGISTRY:
        raise DownloadError(f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    return fetch(entry.url, dest, sha256=options.pop("sha256", None) or entry.sha256,
                 md5=options.pop("md5", None) or entry.md5, **options)
