"""TFRecord files without TensorFlow.

A record is: uint64 length (little-endian), uint32 masked CRC32C of those 8 length bytes,
the data, uint32 masked CRC32C of the data, where mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8
mod 2^32. The reader streams (one record in memory at a time), builds an index of record
offsets on its first pass for random access, and reports damage as a one-line TFRecordError
naming the file, the record index and the reason.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from avcloud.errors import DataError

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
HEADER_BYTES = _HEADER.size  # length + length CRC, before each record's data
# A length this large is damage, not a record (Waymo frames are a few MB; keep a wide margin).
MAX_RECORD_BYTES = 1 << 31


class TFRecordError(DataError):
    """A TFRecord file is damaged: the message names the file, the record index and the reason."""

    def __init__(self, path: str | Path, record_index: int, reason: str, offset: int | None = None) -> None:
        self.path = str(path)
        self.record_index = record_index
        self.reason = reason
        self.offset = offset
        super().__init__(f"{path}: record {record_index}: {reason}")


def masked_crc32c(data: bytes | memoryview) -> int:
    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
    length_bytes = struct.pack("<Q", len(data))
    return length_bytes + struct.pack("<I", masked_crc32c(length_bytes)) + data + struct.pack("<I", masked_crc32c(data))


class TFRecordWriter:
    """Appends records to a TFRecord file; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed by close()/__exit__)
        self.records_written = 0

    def write(self, data: bytes) -> None:
        self._file.write(encode_record(data))
        self.records_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TFRecordReader:
    """Streaming reader of one TFRecord file, with random access by record index.

    Iterating yields each record's data in order. `index` (record start offsets) is built by
    a header-only pass the first time it is needed; `read(i)` then seeks straight to record i.
    With skip_corrupt=True iteration steps over records whose data CRC or payload is bad and
    counts them in `skipped`; a damaged length field ends the file there (nothing after it can
    be located), also counted. verify_crc=False skips CRC computation for speed.
    """

    def __init__(self, path: str | Path, verify_crc: bool = True, skip_corrupt: bool = False) -> None:
        self.path = Path(path)
        self.verify_crc = verify_crc
        self.skip_corrupt = skip_corrupt
        self.skipped = 0
        try:
            self.size_bytes = os.path.getsize(self.path)
        except OSError as error:
            raise DataError(f"{self.path}: cannot open ({error.strerror or error})") from None
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a directory, expected a .tfrecord file")
        self._index: list[int] | None = None

    # -- reading one record at an offset
    def _read_header(self, handle: BinaryIO, record_index: int, offset: int) -> int | None:
        """Length of the record at offset, or None at a clean end of file."""
        header = handle.read(_HEADER.size)
        if not header:
            return None
        if len(header) < _HEADER.size:
            raise TFRecordError(self.path, record_index, f"truncated (length header cut at byte {offset + len(header)})",
                                offset)
        length, length_crc = _HEADER.unpack(header)
        if self.verify_crc and masked_crc32c(header[:8]) != length_crc:
            raise TFRecordError(self.path, record_index, "bad length CRC", offset)
        if length > MAX_RECORD_BYTES:
            raise TFRecordError(self.path, record_index, f"implausible length {length}", offset)
        end = offset + _HEADER.size + length + _FOOTER.size
        if end > self.size_bytes:
            raise TFRecordError(
                self.path, record_index,
                f"truncated (record of {length} bytes at offset {offset} ends past the {self.size_bytes}-byte file)",
                offset,
            )
        return length

    def _read_body(self, handle: BinaryIO, record_index: int, offset: int, length: int) -> bytes:
        data = handle.read(length)
        footer = handle.read(_FOOTER.size)
        if len(data) < length or len(footer) < _FOOTER.size:
            raise TFRecordError(self.path, record_index, "truncated", offset)
        if self.verify_crc and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            raise TFRecordError(self.path, record_index, "bad data CRC", offset)
        return data

    def _salvage_length(self, handle: BinaryIO, offset: int) -> int | None:
        """The length of a record whose length CRC is damaged, if its data CRC proves the length right."""
        handle.seek(offset)
        length = _HEADER.unpack(handle.read(_HEADER.size))[0]
        if offset + _HEADER.size + length + _FOOTER.size > self.size_bytes:
            return None
        data = handle.read(length)
        footer = handle.read(_FOOTER.size)
        return length if masked_crc32c(data) == _FOOTER.unpack(footer)[0] else None

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")  # noqa: SIM115 (callers close it)
        except OSError as error:
            raise DataError(f"{self.path}: cannot open ({error.strerror or error})") from None

    def __iter__(self) -> Iterator[bytes]:
        for _, data in self.records():
            yield data

    def records(self) -> Iterator[tuple[int, bytes]]:
        """(record index, data) in file order; indexes count damaged records too."""
        offsets: list[int] = []
        complete = False
        with self._open() as handle:
            record_index = 0
            offset = 0
            while True:
                try:
                    length = self._read_header(handle, record_index, offset)
                except TFRecordError as error:
                    if not self.skip_corrupt:
                        raise
                    self.skipped += 1
                    length = self._salvage_length(handle, offset) if error.reason == "bad length CRC" else None
                    if length is None:
                        break  # the length is unusable: nothing after it can be located
                    offsets.append(offset)
                    offset += _HEADER.size + length + _FOOTER.size
                    handle.seek(offset)
                    record_index += 1
                    continue
                if length is None:
                    complete = True
                    break
                offsets.append(offset)
                try:
                    data = self._read_body(handle, record_index, offset, length)
                except TFRecordError as error:
                    if not self.skip_corrupt:
                        raise
                    self.skipped += 1
                    if error.reason.startswith("truncated"):
                        break
                    handle.seek(offset + _HEADER.size + length + _FOOTER.size)
                    data = None
                offset += _HEADER.size + length + _FOOTER.size
                if data is not None:
                    yield record_index, data
                record_index += 1
        if complete and self._index is None:
            self._index = offsets

    @property
    def index(self) -> list[int]:
        """Start offset of every record, from a pass that reads only the headers."""
        if self._index is None:
            offsets: list[int] = []
            with self._open() as handle:
                offset = 0
                while True:
                    handle.seek(offset)
                    length = self._read_header(handle, len(offsets), offset)
                    if length is None:
                        break
                    offsets.append(offset)
                    offset += _HEADER.size + length + _FOOTER.size
            self._index = offsets
        return self._index

    @property
    def num_records(self) -> int:
        # Not __len__: list(reader) would call it and build the index before streaming.
        return len(self.index)

    def read(self, index: int) -> bytes:
        """The data of record `index` (negative counts from the end)."""
        offsets = self.index
        if not -len(offsets) <= index < len(offsets):
            raise IndexError(f"{self.path}: record {index} out of range (file has {len(offsets)} records)")
        index %= len(offsets)
        with self._open() as handle:
            handle.seek(offsets[index])
            length = self._read_header(handle, index, offsets[index])
            if length is None:
                raise TFRecordError(self.path, index, "truncated", offsets[index])
            return self._read_body(handle, index, offsets[index], length)
