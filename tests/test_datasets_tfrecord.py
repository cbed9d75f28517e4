"""TFRecord reader/writer: format, CRCs, streaming, random access, damage reporting."""

from __future__ import annotations

import struct

import pytest

from datasets.tfrecord import TFRecordError, TFRecordReader, TFRecordWriter, encode_record, masked_crc32c


def _crc32c_bitwise(data: bytes) -> int:
    """Reference CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("data", [b"", b"123456789", bytes(range(256)) * 3])
def test_masked_crc_matches_the_tfrecord_definition(data):
    assert _crc32c_bitwise(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert masked_crc32c(data) == _mask(_crc32c_bitwise(data))


def test_record_layout_is_length_crc_data_crc():
    encoded = encode_record(b"hello")
    length, length_crc = struct.unpack("<QI", encoded[:12])
    assert length == 5
    assert length_crc == _mask(_crc32c_bitwise(encoded[:8]))
    assert encoded[12:17] == b"hello"
    assert struct.unpack("<I", encoded[17:])[0] == _mask(_crc32c_bitwise(b"hello"))


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.tfrecord"
    payloads = [bytes([i]) * (i * 37 + 1) for i in range(12)] + [b""]
    with TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    return path, payloads


def test_roundtrip_iteration_and_random_access(records_file):
    path, payloads = records_file
    reader = TFRecordReader(path)
    assert list(reader) == payloads
    assert reader.num_records == len(payloads)
    assert reader.index[0] == 0 and reader.index[1] == 12 + 1 + 4
    for i in (5, 0, len(payloads) - 1, -2):
        assert reader.read(i) == payloads[i]
    with pytest.raises(IndexError):
        reader.read(len(payloads))


def test_index_is_built_without_a_full_iteration(records_file):
    path, payloads = records_file
    reader = TFRecordReader(path)
    assert reader.read(7) == payloads[7]


def _damage(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] ^ 0xFF) if value is None else value
    path.write_bytes(bytes(data))


def test_bad_data_crc_names_file_record_and_reason(records_file):
    path, payloads = records_file
    reader = TFRecordReader(path)
    third = reader.index[3]
    _damage(path, third + 12 + 2)  # inside record 3's data
    with pytest.raises(TFRecordError) as error:
        list(TFRecordReader(path))
    assert str(error.value) == f"{path}: record 3: bad data CRC"
    # Without verification the damaged bytes come through.
    assert len(list(TFRecordReader(path, verify_crc=False))) == len(payloads)


def test_bad_length_crc(records_file):
    path, _ = records_file
    offset = TFRecordReader(path).index[2]
    _damage(path, offset + 9)  # the length CRC
    with pytest.raises(TFRecordError, match=r"record 2: bad length CRC"):
        list(TFRecordReader(path))


def test_truncated_file(records_file):
    path, payloads = records_file
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    with pytest.raises(TFRecordError, match=r"record 11: truncated"):
        list(TFRecordReader(path))
    path.write_bytes(data[:-3])  # cut inside the final footer
    with pytest.raises(TFRecordError, match=rf"record {len(payloads) - 1}: truncated"):
        list(TFRecordReader(path))
    path.write_bytes(data[:5])  # cut inside the first header
    with pytest.raises(TFRecordError, match=r"record 0: truncated"):
        list(TFRecordReader(path))


def test_skip_corrupt_reads_past_bad_data_and_counts(records_file):
    path, payloads = records_file
    offsets = TFRecordReader(path).index
    _damage(path, offsets[4] + 12)
    _damage(path, offsets[8] + 12 + 5)
    reader = TFRecordReader(path, skip_corrupt=True)
    records = list(reader.records())
    assert [index for index, _ in records] == [i for i in range(len(payloads)) if i not in (4, 8)]
    assert [data for _, data in records] == [p for i, p in enumerate(payloads) if i not in (4, 8)]
    assert reader.skipped == 2


def test_skip_corrupt_stops_at_an_unusable_length(records_file):
    path, _ = records_file
    offsets = TFRecordReader(path).index
    _damage(path, offsets[6] + 1)  # the length itself: nothing after it can be located
    reader = TFRecordReader(path, skip_corrupt=True)
    assert len(list(reader)) == 6
    assert reader.skipped == 1


def test_skip_corrupt_steps_over_a_damaged_length_crc_when_the_data_proves_the_length(records_file):
    path, payloads = records_file
    offsets = TFRecordReader(path).index
    _damage(path, offsets[5] + 10)  # only the length's CRC, the length itself is intact
    reader = TFRecordReader(path, skip_corrupt=True)
    assert [index for index, _ in reader.records()] == [i for i in range(len(payloads)) if i != 5]
    assert reader.skipped == 1


def test_garbage_length_without_crc_check_is_reported_not_allocated(tmp_path):
    path = tmp_path / "garbage.tfrecord"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(TFRecordError, match="record 0"):
        list(TFRecordReader(path, verify_crc=False))


def test_missing_file_is_a_data_error(tmp_path):
    from avcloud.errors import DataError

    with pytest.raises(DataError, match="cannot open"):
        TFRecordReader(tmp_path / "absent.tfrecord")
