"""Datasets: TFRecord, Waymo v1/v2 readers, synthetic scenes, bandwidth traces, the Waymo-style AP metric."""
