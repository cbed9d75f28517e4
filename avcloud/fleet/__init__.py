"""Fleet: many vehicles, each the shipped onboard agent, sharing one cell's uplink and one cloud
GPU pool on one simulated clock (`avcloud fleet`).

- `cell.py`: the cell's uplink, a trace split among vehicles by a scheduler (pf, equal), or
  private per-vehicle uplinks; exact delivery times through callbacks;
- `simulation.py`: vehicles (scene offsets, start phases), the fleet loop, one fleet run;
- `scoring.py`: per-vehicle mAP, identical to the replay's, with per-image matches memoised;
- `metrics.py`: the fleet's figures (mAP distribution, Jain's index, GPU and uplink utilisation,
  goodput, deadline misses, break-even fleet size);
- `job.py`: the sweep (fleet sizes x pools x traces x policies), as Ray tasks or locally;
- `report.py`: terminal table, results.json, plots, summary;
- `coordinator.py`: the cell-level coordinator policy (`cell`), on optimizer/cell.py.
"""
