"""Datasets: TFRecord, Waymo v1/v2 readers, synthetic scenes, bandwidth traces, the Waymo-style AP metric.

- `tfrecord`: TFRecord reader (streaming, indexed, CRC-checked) and writer, no TensorFlow.
- `waymo_v1`: Waymo v1 `Frame` messages built at import time (source of truth: waymo_frame.proto).
- `waymo_v2`: Waymo v2 parquet components (camera_image, camera_box, camera_calibration) with pyarrow.
- `scene`: `open_scene(path)`, one API over both formats: frames in time order, lazy JPEG decoding.
- `synthetic`: rendered driving segments written as real Waymo v1 tfrecords; the default scene.
- `traces`: Mahimahi and two-column bandwidth traces, statistics, generators, the bundled trace.
- `metric`: AP per class (IoU 0.7 vehicles, 0.5 others), mAP, per window and per camera.
"""
