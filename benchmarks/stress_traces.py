"""Synthetic uplinks that stress what the measured traces rarely show, as Mahimahi files.

Seven 30 s traces: a steady fast link (50 Mbps), a starved one (0.3 Mbps), 5 Mbps with a 3 s
outage in every 10 s, a link dark for its first 5 s then 8 Mbps, a bursty one (40 Mbps for 50 ms
in every 500 ms, 0.2 Mbps otherwise), a 0.5-15.5 Mbps sawtooth with a 4 s period, and handovers:
300 Mbps and 15 Mbps in turn, 3 s each (a fast cell and a loaded one; a fall by 20x within a
frame interval, which none of the measured traces has). Packets are 1500 bytes; within each ms
the count is the rate's expectation, rounded at random (seeded, so the files are the same on
every run). For the policy sweep:

    python benchmarks/stress_traces.py OUT_DIR
    python benchmarks/bench_policies.py --traces OUT_DIR --out runs/bench/policies-stress.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datasets.traces import write_mahimahi

PACKET_BITS = 1500 * 8
DURATION_MS = 30_000

# name -> rate in Mbps at each ms (an array of ms since the start)
RATES_MBPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fast50.up": lambda ms: np.full(ms.shape, 50.0),
    "slow03.up": lambda ms: np.full(ms.shape, 0.3),
    "outage3of10.up": lambda ms: np.where((ms // 1000) % 10 >= 7, 0.0, 5.0),
    "startdark5s.up": lambda ms: np.where(ms < 5000, 0.0, 8.0),
    "bursty.up": lambda ms: np.where((ms // 50) % 10 == 0, 40.0, 0.2),
    "sawtooth.up": lambda ms: 0.5 + 15.0 * (ms % 4000) / 4000.0,
    # Last: the random rounding draws in this order, so the traces above stay as they were.
    "handover.up": lambda ms: np.where((ms // 3000) % 2 == 0, 300.0, 15.0),
}


def opportunities_ms(rate_mbps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mahimahi delivery opportunities (one line per packet, ms from 1) for a rate per ms."""
    expected = rate_mbps * 1e6 / PACKET_BITS / 1000.0  # packets per ms
    counts = np.floor(expected).astype(np.int64) + (rng.random(expected.shape) < expected % 1.0)
    return np.repeat(np.arange(1, expected.shape[0] + 1), counts)


def write_traces(out_dir: Path, seed: int = 3) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ms = np.arange(DURATION_MS)
    paths = []
    for name, rate in RATES_MBPS.items():
        lines = opportunities_ms(rate(ms), rng)
        if lines.shape[0] == 0:  # a trace needs at least one opportunity
            lines = np.array([DURATION_MS])
        paths.append(write_mahimahi(out_dir / name, lines))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the .up files into")
    args = parser.parse_args()
    for path in write_traces(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
