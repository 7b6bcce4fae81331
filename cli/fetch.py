"""Download manifest files safely: resume, verify, then move into place.

A download goes to ``<target>.part`` (resumed with an HTTP ``Range`` request, guarded by ``If-Range``
so a file that changed upstream restarts instead of being spliced), is checked against the published
size and sha256, and only then renamed onto the target with :func:`os.replace`. A file with a wrong
hash is deleted, never installed. Zip archives (insightface packs) are checked (CRCs, member list)
and their members extracted flat into the target folder.

Standard library only (urllib), so it works before anything else is installed.
"""
from __future__ import annotations

import http.client
import json
import os
import posixpath
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

from ..errors import LikenessError
from .manifest import (
    HASH_MISMATCH,
    NESTED,
    OK,
    SIZE_MISMATCH,
    TRUNCATED,
    UNVERIFIED,
    ModelEntry,
    ModelsLocation,
    check_entry,
    file_sha256,
    format_size,
    url_problem,
)

USER_AGENT = "likeness-models-fetch/0.1 (python-urllib)"
CHUNK = 1 << 20
TIMEOUT = 30.0
# Extracting an archive needs room for its members next to the zip.
ARCHIVE_EXTRACT_FACTOR = 1.5


class FetchError(LikenessError):
    """A download failed; the message says what happened and whether re-running resumes it."""


class HashMismatchError(FetchError):
    """The downloaded bytes do not have the published sha256; they were deleted."""


# --------------------------------------------------------------------------------------------------
# Progress on stderr


class ProgressLine:
    """``name  12.3/156.6 MB  8%  4.1 MB/s`` on one rewritten line (a tty) or every 10% (a log)."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, start: int = 0):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.started, self.start_bytes = time.monotonic(), start
        self.last_print, self.last_decile = 0.0, -1
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        rate = (done - self.start_bytes) / max(now - self.started, 1e-6)
        if self.total:
            percent = min(100, int(done * 100 / self.total))
            text = f"{self.label}  {done / 1e6:.1f}/{self.total / 1e6:.1f} MB  {percent}%  {rate / 1e6:.1f} MB/s"
            decile = percent // 10
        else:
            text, decile = f"{self.label}  {done / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s", int(done // 100e6)
        if self.tty:
            if force or now - self.last_print >= 0.25:
                self.stream.write("\r" + text.ljust(78))
                self.stream.flush()
                self.last_print = now
        elif force or decile != self.last_decile:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last_decile = decile

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------
# One HTTP download with resume


def _read_meta(meta_path: str) -> dict:
    try:
        with open(meta_path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_meta(meta_path: str, url: str, validator: str | None) -> None:
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump({"url": url, "validator": validator}, f)


def remove_partial(part_path: str) -> None:
    for path in (part_path, part_path + ".meta"):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _http_error_message(url: str, exc: urllib.error.HTTPError) -> str:
    host = urlsplit(url).hostname
    if exc.code in (401, 403):
        return (f"{host} refused the download (HTTP {exc.code}): the file may need a login or accepting its "
                f"licence on the model page. Download {url} in a browser instead.")
    if exc.code == 404:
        return f"{url} does not exist (HTTP 404): the file was moved or deleted upstream."
    return f"{host} answered HTTP {exc.code} {exc.reason} for {url}."


def download(url: str, part_path: str, expected_size: int | None = None, progress: ProgressLine | None = None,
             timeout: float = TIMEOUT, _restarted: bool = False) -> int:
    """Download ``url`` into ``part_path``, continuing a previous partial download; return its size.

    Raises :class:`FetchError` when the host is unreachable or the transfer breaks; the partial file is
    kept so the next call resumes it.
    """
    problem = url_problem(url)
    if problem:
        raise FetchError(problem)
    have, meta = _partial_download(url, part_path)
    if have and expected_size is not None and have >= expected_size:
        return have
    host = urlsplit(url).hostname
    response = _open(url, _request_headers(have, meta), part_path, have, timeout)
    if response is None:  # HTTP 416, nothing left to send: the partial file is already complete
        return have
    with response:
        final_problem = url_problem(response.geturl())
        if final_problem:
            raise FetchError(f"{url} redirected to an unsafe address: {final_problem}")
        placement = _placement(response, have)
        if placement is None:  # resumed at another byte than asked: start over, once
            if _restarted:
                raise FetchError(f"{host} sent an unexpected byte range ({response.headers.get('Content-Range')}).")
            remove_partial(part_path)
            return download(url, part_path, expected_size, progress, timeout, _restarted=True)
        have, mode = placement
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        _write_meta(part_path + ".meta", url, _strong_validator(response.headers))
        if progress is not None:
            progress.start_bytes = have
        received = _copy_body(response, part_path, mode, have, progress, host)
    if remaining is not None and received < remaining:
        raise FetchError(f"The transfer from {host} was interrupted after {format_size(have + received)}. "
                         f"{_resume_note(part_path, have + received)}")
    return have + received


def _partial_download(url: str, part_path: str) -> tuple[int, dict]:
    """Bytes already in ``part_path`` and its meta data; a partial file from another source is dropped."""
    have = os.path.getsize(part_path) if os.path.isfile(part_path) else 0
    meta = _read_meta(part_path + ".meta")
    if have and meta.get("url") != url:  # it cannot be continued from this url
        remove_partial(part_path)
        return 0, {}
    return have, meta


def _request_headers(have: int, meta: dict) -> dict:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    return headers


def _open(url: str, headers: dict, part_path: str, have: int, timeout: float):
    """The HTTP response, or None when the server says the range is past the end (416 on a resume)."""
    host = urlsplit(url).hostname
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return None
        raise FetchError(_http_error_message(url, exc)) from None
    except urllib.error.URLError as exc:
        raise FetchError(f"Cannot reach {host} ({exc.reason}). Are you offline or behind a proxy? "
                         f"{_resume_note(part_path, have)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"Connecting to {host} failed ({exc}). {_resume_note(part_path, have)}") from None


def _placement(response, have: int) -> tuple[int, str] | None:
    """Where the body goes: (offset, file mode). 206 from byte ``have``: appended; 200 (the server
    ignored Range, or If-Range saw a changed file): from scratch; 206 from another byte: None."""
    if response.status != 206:
        return 0, "wb"
    start = _content_range_start(response.headers.get("Content-Range", ""))
    return (have, "ab") if start == have else None


def _copy_body(response, part_path: str, mode: str, have: int, progress: ProgressLine | None, host: str) -> int:
    received = 0
    with open(part_path, mode) as out:
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                out.flush()
                raise FetchError(f"The transfer from {host} was interrupted after "
                                 f"{format_size(have + received)} ({type(exc).__name__}: {exc}). "
                                 f"{_resume_note(part_path, have + received)}") from None
            if not block:
                break
            try:
                out.write(block)
            except OSError as exc:
                raise FetchError(f"Cannot write {part_path}: {exc}. Free some disk space and run the command "
                                 f"again; the download resumes.") from None
            received += len(block)
            if progress is not None:
                progress.update(have + received)
    return received


def _strong_validator(headers) -> str | None:
    """What ``If-Range`` may carry: a strong ETag, else Last-Modified (a weak ETag never matches)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _resume_note(part_path: str, have: int) -> str:
    if have:
        return (f"The partial download ({format_size(have)}) is kept at {part_path}; run the same command again "
                f"to resume it.")
    return "Nothing was changed."


# --------------------------------------------------------------------------------------------------
# Installing an entry


def install_zip(zip_path: str, members: tuple[str, ...], dest_dir: str) -> list[str]:
    """Check ``zip_path`` (CRC of every member, expected names present) and extract ``members`` flat.

    Members are matched by base name wherever they sit inside the zip (``antelopev2.zip`` holds an
    ``antelopev2/`` folder), so the files always land directly in ``dest_dir``. Nothing outside the
    listed names is written, so a hostile zip cannot escape ``dest_dir``.
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{zip_path} is not a valid zip archive ({exc}).") from None
    with archive:
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise FetchError(f"{zip_path} is corrupt ({exc}).") from None
        if bad is not None:
            raise FetchError(f"{zip_path} is corrupt: member '{bad}' fails its CRC check.")
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            name = info.filename.replace("\\", "/")
            base = posixpath.basename(name)
            if info.is_dir() or name.startswith("__MACOSX/") or base.startswith("._"):
                continue
            by_name.setdefault(base, info)
        missing = [m for m in members if m not in by_name]
        if missing:
            raise FetchError(f"{zip_path} lacks {', '.join(missing)}: not the expected archive.")
        os.makedirs(dest_dir, exist_ok=True)
        written = []
        for member in members:
            final = os.path.join(dest_dir, member)
            temp = final + ".tmp"
            with archive.open(by_name[member]) as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            os.replace(temp, final)
            written.append(final)
    return written


@dataclass
class FetchResult:
    entry: ModelEntry
    message: str
    paths: list[str] = field(default_factory=list)


def _check_disk_space(directory: str, needed: int | None) -> None:
    if not needed:
        return
    probe = directory
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise FetchError(f"Not enough disk space in {probe}: {format_size(free)} free, about "
                         f"{format_size(needed)} needed.")


def fetch_entry(entry: ModelEntry, location: ModelsLocation, force: bool = False,
                stream: TextIO | None = None, timeout: float = TIMEOUT) -> FetchResult:
    """Make ``entry`` present and verified under ``location`` (download it unless it already is)."""
    stream = stream or sys.stderr
    status = check_entry(entry, location, hash_files=True)
    if not force:
        if status.state == OK:
            return FetchResult(entry, f"already present and verified: {status.files[0].path}")
        if status.state == UNVERIFIED:
            return FetchResult(entry, f"already present at {_where(status)} (no published hash to "
                                                 f"verify it; use --force to download it again)")
        if status.state == NESTED:
            nested = next(f for f in status.files if f.state == NESTED)
            return FetchResult(entry, f"{nested.detail} (or use --force to download it again)")
    if status.state in (HASH_MISMATCH, SIZE_MISMATCH, TRUNCATED):
        bad = next(f for f in status.files if f.state in (HASH_MISMATCH, SIZE_MISMATCH, TRUNCATED))
        stream.write(f"{entry.id}: the file at {bad.path} is bad ({bad.state}); downloading a fresh copy\n")

    target_dir = location.target_dir(entry)
    target = location.target_path(entry)
    part = target + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    expected = entry.expected_bytes
    needed = (expected - have) if expected else None
    if needed is not None and entry.is_archive:
        needed += int(expected * ARCHIVE_EXTRACT_FACTOR)
    _check_disk_space(target_dir, needed)
    os.makedirs(target_dir, exist_ok=True)

    verb = "resuming" if have else "downloading"
    stream.write(f"{entry.id}: {verb} {entry.url}\n    -> {target if not entry.is_archive else target_dir + os.sep}\n")
    progress = ProgressLine(entry.filename, entry.size or expected, stream, start=have)
    try:
        size = download(entry.url, part, entry.size, progress, timeout=timeout)
    except BaseException:
        if progress.tty:
            stream.write("\n")
        raise
    progress.finish(size)
    _verify_download(entry, part, size, stream)

    if entry.is_archive:
        try:
            paths = install_zip(part, entry.archive_members, target_dir)
        except FetchError:
            remove_partial(part)
            raise
        remove_partial(part)
        return FetchResult(entry, f"installed {len(paths)} files into {target_dir}", paths)
    os.replace(part, target)
    remove_partial(part)
    return FetchResult(entry, f"installed {target}", [target])


def _verify_download(entry: ModelEntry, part: str, size: int, stream: TextIO) -> None:
    """Size and sha256 of the finished ``.part``; a wrong file is deleted so it can never be used."""
    if entry.size is not None and size != entry.size:
        if size > entry.size:
            remove_partial(part)
            raise FetchError(f"{entry.id}: received {size} bytes but the file has {entry.size}: the download was "
                             f"deleted; nothing was installed.")
        raise FetchError(f"{entry.id}: the download is incomplete ({size} of {entry.size} bytes). "
                         f"{_resume_note(part, size)}")
    if not entry.sha256:
        stream.write(f"{entry.id}: no published sha256; the file is not verified beyond "
                     f"{'its zip checksums' if entry.is_archive else 'its transfer'}\n")
        return
    stream.write(f"{entry.id}: checking sha256 ...\n")
    got = file_sha256(part)
    if got != entry.sha256:
        remove_partial(part)
        raise HashMismatchError(f"{entry.id}: hash mismatch: the download has sha256 {got}, expected "
                                f"{entry.sha256}. It was deleted and nothing was installed. Run the command again; "
                                f"if it keeps failing the file changed upstream: report it.")


def _where(status) -> str:
    paths = sorted({os.path.dirname(f.path) if status.entry.is_archive else f.path
                    for f in status.files if f.path})
    return ", ".join(paths)
