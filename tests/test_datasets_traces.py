"""Bandwidth traces: formats, conversion, statistics, generators, the bundled trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avcloud.errors import DataError, UserError
from avcloud.link import DeliverySchedule
from datasets import traces
from datasets.traces import Trace, load_trace

SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def test_mahimahi_roundtrip_and_repeated_lines(tmp_path):
    path = tmp_path / "link.up"
    path.write_text("1\n1\n1\n5\n7\n7\n10\n")
    trace = load_trace(path)
    assert trace.name == "link.up"
    assert trace.opportunities_ms.tolist() == [1, 1, 1, 5, 7, 7, 10]
    assert trace.opportunities_ms.dtype == np.int64
    assert trace.duration_s == 0.01
    # 7 packets of 1500 bytes every 10 ms.
    assert trace.mean_mbps == pytest.approx(7 * 12000 / 10 / 1000)
    assert isinstance(trace.schedule, DeliverySchedule) and trace.schedule.period_ms == 10
    out = traces.write_mahimahi(tmp_path / "copy.up", trace.opportunities_ms)
    assert load_trace(out).opportunities_ms.tolist() == trace.opportunities_ms.tolist()


def test_single_line_is_a_fixed_rate_link(tmp_path):
    path = tmp_path / "12mbps.up"
    path.write_text("1\n")
    assert load_trace(path).mean_mbps == pytest.approx(12.0)


def test_two_column_becomes_evenly_spread_packets(tmp_path):
    path = tmp_path / "capacity.txt"
    path.write_text("# seconds Mbps\n0 12\n2 0\n3 6\n")
    trace = load_trace(path)
    assert trace.duration_s == 4.0
    per_second = trace.per_second_mbps()
    np.testing.assert_allclose(per_second[:3], [12.0, 12.0, 0.0])
    assert per_second[3] == pytest.approx(6.0)
    first_second = trace.opportunities_ms[trace.opportunities_ms <= 1000]
    assert first_second.size == 1000 and np.all(np.diff(first_second) == 1)  # 12 Mbps = one packet per ms
    third = trace.opportunities_ms[(trace.opportunities_ms > 3000)]
    assert np.all(np.diff(third) == 2)  # 6 Mbps = one every 2 ms


def test_fractional_packets_carry_over(tmp_path):
    # 0.018 Mbps = 1.5 packets per second: 3 packets over two seconds.
    opportunities = traces.per_second_to_opportunities([0.018, 0.018])
    assert opportunities.size == 3
    assert opportunities[-1] == 2000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty trace"),
        ("1\n2\nabc\n", "line 3: expected one non-negative integer"),
        ("5\n3\n", "line 2: timestamp 3 ms goes back"),
        ("0 1\n1 x\n", "line 2: expected 'seconds Mbps'"),
        ("0 1\n0 2\n", "line 2: time 0 s does not increase"),
        ("1 2 3\n", "line 1: expected one integer"),
        ("0 -1\n", "line 1: seconds and Mbps must be finite and non-negative"),
        ("0\n", "last timestamp must be positive"),
    ],
)
def test_garbage_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.trace"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_trace(path)
    assert str(error.value).startswith(str(path))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_trace(tmp_path / "absent.up")
    binary = tmp_path / "binary.up"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not a text trace"):
        load_trace(binary)


def test_stats_of_a_step_trace():
    trace = Trace("steps", traces.step_trace([12.0, 0.0, 6.0], step_s=2))
    stats = trace.stats()
    assert stats["duration_s"] == 6.0
    assert stats["seconds_at_zero"] == 2
    assert stats["mean_mbps"] == pytest.approx(6.0, rel=1e-3)
    assert stats["p50_mbps"] == pytest.approx(6.0, rel=1e-3)
    assert stats["max_mbps"] == pytest.approx(12.0)
    assert stats["p10_mbps"] == pytest.approx(0.0)


def test_constant_trace():
    opportunities = traces.constant_trace(24.0, 10.0)
    trace = Trace("c", opportunities)
    assert trace.mean_mbps == pytest.approx(24.0)
    assert trace.duration_s == 10.0
    assert np.ptp(trace.per_second_mbps()) < 0.05


def test_markov_lte_trace_is_deterministic_and_lte_like():
    a = traces.markov_lte_trace(3, duration_s=120.0, mean_mbps=10.0)
    assert np.array_equal(a, traces.markov_lte_trace(3, duration_s=120.0, mean_mbps=10.0))
    assert not np.array_equal(a, traces.markov_lte_trace(4, duration_s=120.0, mean_mbps=10.0))
    trace = Trace("lte", a)
    stats = trace.stats()
    assert trace.duration_s == 120.0
    assert 8.0 < stats["mean_mbps"] < 12.0
    assert stats["p10_mbps"] < 0.6 * stats["mean_mbps"] < stats["p90_mbps"]
    per_second = trace.per_second_mbps() - stats["mean_mbps"]
    # Capacity varies on the scale of seconds: strongly correlated from one second to the next.
    assert np.mean(per_second[1:] * per_second[:-1]) / np.var(per_second) > 0.4


def test_bundled_trace_matches_its_description():
    path = traces.default_trace_path()
    assert path.exists() and path.stat().st_size < 1_000_000
    stats = load_trace(path).stats()
    assert stats["duration_s"] >= 120
    assert 8.0 <= stats["mean_mbps"] <= 12.0
    assert stats["p10_mbps"] < 4.0 and stats["p90_mbps"] > 15.0
    assert stats["min_mbps"] < 1.0  # at least one deep fade
    assert stats["max_mbps"] < 30.0
    # It is reproducible from the generator.
    assert np.array_equal(load_trace(path).opportunities_ms, traces.markov_lte_trace(*traces.DEFAULT_TRACE_ARGS))


def test_two_column_write_and_read_back(tmp_path):
    path = traces.write_two_column(tmp_path / "t.txt", [5.0, 10.0, 0.0, 2.5])
    trace = load_trace(path)
    np.testing.assert_allclose(trace.per_second_mbps(), [5.0, 10.0, 0.0, 2.5], atol=0.02)


@pytest.mark.skipif(not SHARED_TRACES.is_dir(), reason="../shared/traces not present")
def test_real_uplink_traces_load():
    for path in sorted(SHARED_TRACES.glob("*.up")):
        trace = load_trace(path)
        stats = trace.stats()
        assert stats["duration_s"] > 60
        assert 0.5 < stats["mean_mbps"] < 50
        assert trace.schedule.mean_mbps() == pytest.approx(stats["mean_mbps"])


def _fake_deb(files: dict[str, bytes]) -> bytes:
    """A .deb (ar archive) whose data.tar.xz holds `files` under ./usr/share/mahimahi/traces/."""
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        for name, content in {**files, "../elsewhere/evil.up": b"1\n"}.items():
            info = tarfile.TarInfo(f"./usr/share/mahimahi/traces/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", data.getvalue())]
    out = b"!<arch>\n"
    for name, content in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}".encode() + b"`\n" + content
        out += b"\n" if len(content) % 2 else b""
    return out


def test_mahimahi_traces_are_unpacked_from_the_debian_package_and_checked(tmp_path, monkeypatch):
    import hashlib

    from datasets import mahimahi_package

    package = _fake_deb({"Carrier-LTE.up": b"1\n2\n3\n", "Carrier-LTE.down": b"5\n", "README": b"about\n"})
    monkeypatch.setattr(mahimahi_package, "download", lambda url, progress=True: package)
    written = mahimahi_package.fetch_traces(tmp_path / "traces", sha256=hashlib.sha256(package).hexdigest())
    assert sorted(path.name for path in written) == ["Carrier-LTE.down", "Carrier-LTE.up", "README"]
    assert sorted(path.name for path in (tmp_path / "traces").iterdir()) == ["Carrier-LTE.down", "Carrier-LTE.up", "README"]
    assert load_trace(tmp_path / "traces" / "Carrier-LTE.up").opportunities_ms.tolist() == [1, 2, 3]
    # Fetching again is harmless; a user's own file of the same name is kept unless forced.
    digest = hashlib.sha256(package).hexdigest()
    mahimahi_package.fetch_traces(tmp_path / "traces", sha256=digest)
    (tmp_path / "traces" / "README").write_text("my notes\n")
    with pytest.raises(UserError, match="README exists with other content"):
        mahimahi_package.fetch_traces(tmp_path / "traces", sha256=digest)
    assert (tmp_path / "traces" / "README").read_text() == "my notes\n"
    mahimahi_package.fetch_traces(tmp_path / "traces", sha256=digest, force=True)
    assert (tmp_path / "traces" / "README").read_text() == "about\n"
    with pytest.raises(DataError, match="SHA-256"):
        mahimahi_package.fetch_traces(tmp_path / "other", sha256="0" * 64)
    with pytest.raises(DataError, match="not a Debian package"):
        mahimahi_package.trace_files(b"PK\x03\x04 a zip")
    with pytest.raises(DataError, match="cut short"):
        mahimahi_package.trace_files(package[:200])


def test_trace_fetch_cli_names_an_unwritable_folder_before_downloading(tmp_path, capsys, monkeypatch):
    from avcloud.cli import main
    from datasets import mahimahi_package

    monkeypatch.setattr(mahimahi_package, "download", lambda *args, **kwargs: pytest.fail("downloaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["trace", "fetch", "--out", str(blocker / "traces")]) == 2
    assert "cannot write traces to" in capsys.readouterr().err


def test_a_full_disk_mid_fetch_leaves_no_half_written_trace(tmp_path, monkeypatch):
    import errno
    import hashlib

    from datasets import mahimahi_package

    package = _fake_deb({"Carrier-LTE.up": b"1\n2\n3\n"})
    monkeypatch.setattr(mahimahi_package, "download", lambda url, progress=True: package)

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mahimahi_package.os, "replace", full_disk)
    with pytest.raises(UserError, match="No space left"):
        mahimahi_package.fetch_traces(tmp_path, sha256=hashlib.sha256(package).hexdigest())
    assert list(tmp_path.iterdir()) == []
