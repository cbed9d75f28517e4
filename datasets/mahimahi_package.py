"""More measured cellular traces: the ones Mahimahi ships, from Debian's `mahimahi-traces` package.

Debian (bullseye) packages the Saturator recordings (Winstein, Sivaraman and Balakrishnan, NSDI
2013) that Mahimahi ships: LTE drives on three US carriers, a UMTS and an EVDO drive, each as an
uplink (`.up`) and a downlink (`.down`): 16 files and a README. A package registry can be
reached where dataset buckets cannot, so `avcloud trace fetch` gets them from there: the .deb is
checked against its pinned SHA-256, unpacked in memory (an `ar` archive holding `data.tar.xz`),
and the trace files are written to a folder, each through a temporary file, so an interrupted
fetch leaves no half-written trace.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from avcloud.errors import DataError, UserError

PACKAGE_URL = "https://deb.debian.org/debian/pool/main/m/mahimahi/mahimahi-traces_0.98-1.1_all.deb"
PACKAGE_SHA256 = "31f096d488d66e141641a3a9517932b9106936824824c0d27a12fbd2a045e1ac"
TRACES_IN_PACKAGE = "usr/share/mahimahi/traces/"
DOWNLOAD_TIMEOUT_S = 60.0
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER_BYTES = 60


def download(url: str, progress: bool = True, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The bytes at `url`; UserError naming the URL and what went wrong."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (pinned URL + SHA-256)
            total = int(response.headers.get("Content-Length") or 0) or None
            chunks = []
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), disable=not progress) as bar:
                task = bar.add_task(Path(url).name, total=total)
                while chunk := response.read(1 << 16):
                    chunks.append(chunk)
                    bar.advance(task, len(chunk))
            return b"".join(chunks)
    except urllib.error.HTTPError as error:
        raise UserError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(f"cannot download {url}: {reason}") from None


def ar_members(archive: bytes, source: str = "package") -> dict[str, bytes]:
    """The members of a Unix `ar` archive (the container of a .deb), by name."""
    if not archive.startswith(_AR_MAGIC):
        raise DataError(f"{source}: not a Debian package (no ar archive header)")
    members: dict[str, bytes] = {}
    position = len(_AR_MAGIC)
    while position + _AR_HEADER_BYTES <= len(archive):
        header = archive[position:position + _AR_HEADER_BYTES]
        if header[58:60] != b"`\n":
            raise DataError(f"{source}: damaged ar member header at byte {position}")
        name = header[0:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DataError(f"{source}: damaged ar member size at byte {position}") from None
        start = position + _AR_HEADER_BYTES
        if start + size > len(archive):
            raise DataError(f"{source}: ar member '{name}' is cut short")
        members[name] = archive[start:start + size]
        position = start + size + (size % 2)  # members are padded to an even length
    return members


def trace_files(package: bytes, source: str = "package") -> dict[str, bytes]:
    """The trace files (and README) of a `mahimahi-traces` .deb, by file name."""
    data = ar_members(package, source).get("data.tar.xz")
    if data is None:
        raise DataError(f"{source}: the package has no data.tar.xz")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as archive:
            for member in archive.getmembers():
                path = member.name.removeprefix("./")
                if member.isfile() and path.startswith(TRACES_IN_PACKAGE) and "/" not in path[len(TRACES_IN_PACKAGE):]:
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        files[Path(path).name] = extracted.read()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as error:
        raise DataError(f"{source}: cannot unpack data.tar.xz ({error})") from None
    if not files:
        raise DataError(f"{source}: no traces under /{TRACES_IN_PACKAGE}")
    return files


def fetch_traces(out_dir: Path, url: str = PACKAGE_URL, sha256: str = PACKAGE_SHA256,
                 progress: bool = True, force: bool = False) -> list[Path]:
    """Download the package, check it, and write its traces to `out_dir`; the paths written. A
    file of the same name with other content is replaced only with `force`."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails before the download
    except OSError as error:
        raise UserError(f"cannot write traces to {out_dir}: {error.strerror or error}") from None
    package = download(url, progress)
    digest = hashlib.sha256(package).hexdigest()
    if digest != sha256.lower():
        raise DataError(f"{url}: SHA-256 {digest} is not the expected {sha256.lower()}")
    files = trace_files(package, url)
    differing = sorted(name for name, content in files.items()
                       if (out_dir / name).is_file() and (out_dir / name).read_bytes() != content)
    if differing and not force:
        raise UserError(f"{out_dir / differing[0]} exists with other content; move it away or pass --force")
    written = []
    partial = None
    try:
        for name, content in sorted(files.items()):
            partial = out_dir / f".{name}.partial"
            partial.write_bytes(content)
            os.replace(partial, out_dir / name)
            partial = None
            written.append(out_dir / name)
    except OSError as error:
        raise UserError(f"cannot write traces to {out_dir}: {error.strerror or error}") from None
    finally:  # a full disk or Ctrl-C mid-file leaves no half-written file behind
        if partial is not None:
            partial.unlink(missing_ok=True)
    return written
