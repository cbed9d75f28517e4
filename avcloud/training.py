"""Training the project's detector family on synthetic scenes (`avcloud models train`).

Top-level orchestration (like the profiler): it imports `datasets` for the renderer and the
metric, while the architecture and export live in `avcloud.models.centernet`.

Data: frames rendered by `datasets.synthetic.render_camera` for seeds 1.. (seed 0 is the
held-out default scene), stored once as JPEG (as Waymo camera images are) in a pool under
cache_dir()/training. Each model trains on fixed-size crops of its own input view (the full
frame stretched to the model's input size, as inference does), so the larger models cost
little more per step and see their objects at the resolution they will see them at run time.
The largest model gets larger crops (fewer per batch): at 1152x768 a near car is wider than
the default crop.
Augmentation: random JPEG re-encoding (quality 50-95) so the models tolerate compression, and
horizontal flips. Loss: CenterNet's penalty-reduced focal loss on the class heatmaps plus L1 on
log box size and centre offset at the object centres.

`--preset zoo` trains the family from scratch (5000 steps per model, two models in parallel
processes, one thread each). `--preset finetune --from DIR` continues from trained weights,
e.g. after the synthetic renderer changed (the training pool is keyed by the renderer's
version, so new frames are rendered) or to add the zero-initialised stride-32 stage to weights
trained without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avcloud.compression import resize_image
from avcloud.errors import UserError
from avcloud.models.cards import ModelCard, OutputConvention, TorchWeights, save_card
from avcloud.models.centernet import FAMILY, FAMILY_CLASS_MAP, OUTPUT_STRIDE, CenterNetSpec
from avcloud.paths import cache_dir
from avcloud.pools import serve_the_parent_only, stop_pool
from avcloud.types import ALL_CAMERAS, GroundTruth, ObjectType

NORMALISATION_MEAN = (110.0, 110.0, 110.0)
NORMALISATION_STD = (60.0, 60.0, 60.0)
# Waymo object type -> model class index (the inverse of FAMILY_CLASS_MAP).
CLASS_INDEX = {int(ObjectType[name]): index for index, name in FAMILY_CLASS_MAP.items()}
HELD_OUT_SEED = 0


@dataclass(frozen=True)
class TrainingPreset:
    steps: int
    batch_size: int
    learning_rate: float
    pool_seeds: tuple[int, ...]
    pool_frame_indices: tuple[int, ...]
    crop_wh: tuple[int, int]
    jpeg_probability: float = 0.6
    # Per model (crop, batch size) where the default crop is too small: at 1152x768 near objects
    # span more than a 384x256 crop, so the largest model would never see one whole.
    large_crops: tuple[tuple[str, tuple[int, int], int], ...] = ()

    def crop_and_batch_for(self, model: str) -> tuple[tuple[int, int], int]:
        for name, crop_wh, batch_size in self.large_crops:
            if name == model:
                return crop_wh, batch_size
        return self.crop_wh, self.batch_size


_ZOO_PRESET = TrainingPreset(
    steps=5000,
    batch_size=12,
    learning_rate=3e-3,
    pool_seeds=tuple(range(1, 17)),
    pool_frame_indices=tuple(range(0, 200, 25)),
    crop_wh=(384, 256),
    large_crops=(("avd-cloud-l", (576, 384), 8),),  # same pixels per step as 18 default crops
)

PRESETS: dict[str, TrainingPreset] = {
    "zoo": _ZOO_PRESET,
    # Adapting trained weights (--from DIR), e.g. to a changed renderer: the zoo's data, a short,
    # gentle schedule.
    "finetune": dataclasses.replace(
        _ZOO_PRESET, steps=1500, learning_rate=1.5e-3, large_crops=(("avd-cloud-l", (576, 384), 12),)
    ),
    # A few steps on a handful of frames: exercises the whole path in seconds (tests).
    "smoke": TrainingPreset(
        steps=3,
        batch_size=2,
        learning_rate=1e-3,
        pool_seeds=(1,),
        pool_frame_indices=(5,),
        crop_wh=(128, 96),
    ),
}


# ----------------------------------------------------------------------------- data


@dataclass
class PoolImage:
    camera: str
    jpeg_bytes: bytes
    width: int
    height: int
    ground_truth: GroundTruth


def _render_pool_image(job: tuple[int, int, str]) -> PoolImage:
    from datasets.synthetic import render_camera

    seed, frame_index, camera = job
    image, ground_truth = render_camera(seed, frame_index, camera)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return PoolImage(camera, jpeg.tobytes(), image.shape[1], image.shape[0], ground_truth)


def training_pool(preset: TrainingPreset, workers: int = 2, progress: Callable[[int, int], None] | None = None) -> list[PoolImage]:
    """The preset's rendered training frames, rendered once and cached under cache_dir()/training."""
    if HELD_OUT_SEED in preset.pool_seeds:
        raise UserError(f"seed {HELD_OUT_SEED} is the held-out default scene; do not train on it")
    from datasets.synthetic import SYNTHETIC_VERSION

    # The renderer's version is part of the key: a changed renderer means new training frames.
    key = f"seeds={preset.pool_seeds} frames={preset.pool_frame_indices} jpeg=95 renderer={SYNTHETIC_VERSION}"
    path = cache_dir() / "training" / f"pool-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pkl"
    if path.exists():
        with path.open("rb") as stream:
            return pickle.load(stream)
    jobs = [(seed, frame, camera) for seed in preset.pool_seeds for frame in preset.pool_frame_indices for camera in ALL_CAMERAS]
    pool: list[PoolImage] = []
    if workers > 1:
        executor = ProcessPoolExecutor(workers, initializer=serve_the_parent_only)
        try:
            for image in executor.map(_render_pool_image, jobs, chunksize=4):
                pool.append(image)
                if progress:
                    progress(len(pool), len(jobs))
        except BaseException:  # SIGINT, SIGTERM or a failed render: no worker outlives the command
            stop_pool(executor)
            raise
        executor.shutdown(wait=True)
    else:
        for job in jobs:
            pool.append(_render_pool_image(job))
            if progress:
                progress(len(pool), len(jobs))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with temporary.open("wb") as stream:
        pickle.dump(pool, stream)
    os.replace(temporary, path)
    return pool


@dataclass
class ModelView:
    """A pool image as the model sees it: stretched to the input size, boxes scaled alike."""

    image: np.ndarray  # BGR uint8 [H, W, 3] at the model input size
    boxes: np.ndarray  # float32 [K, 4] in input pixels
    class_index: np.ndarray  # int64 [K]


def model_views(pool: Sequence[PoolImage], spec: CenterNetSpec) -> list[ModelView]:
    views = []
    for item in pool:
        full = cv2.imdecode(np.frombuffer(item.jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
        image = resize_image(full, (spec.input_width, spec.input_height))
        scale = np.array(
            [spec.input_width / item.width, spec.input_height / item.height] * 2, dtype=np.float32
        )
        known = np.isin(item.ground_truth.classes, list(CLASS_INDEX))
        boxes = item.ground_truth.boxes_xyxy[known] * scale
        class_index = np.array([CLASS_INDEX[int(c)] for c in item.ground_truth.classes[known]], dtype=np.int64)
        views.append(ModelView(image, boxes.astype(np.float32), class_index))
    return views


def _draw_targets(
    boxes: np.ndarray, class_index: np.ndarray, output_wh: tuple[int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CenterNet targets at stride 4: Gaussian class heatmaps, log sizes, offsets, centre mask."""
    out_w, out_h = output_wh
    heatmap = np.zeros((num_classes, out_h, out_w), np.float32)
    log_size = np.zeros((2, out_h, out_w), np.float32)
    offset = np.zeros((2, out_h, out_w), np.float32)
    mask = np.zeros((out_h, out_w), np.float32)
    for (x1, y1, x2, y2), cls in zip(boxes, class_index, strict=True):
        width, height = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        centre_x, centre_y = (x1 + x2) / 2 / OUTPUT_STRIDE, (y1 + y2) / 2 / OUTPUT_STRIDE
        cell_x, cell_y = int(centre_x), int(centre_y)
        if not (0 <= cell_x < out_w and 0 <= cell_y < out_h):
            continue
        sigma_x = max(0.5, width / OUTPUT_STRIDE / 6)
        sigma_y = max(0.5, height / OUTPUT_STRIDE / 6)
        radius_x, radius_y = int(math.ceil(3 * sigma_x)), int(math.ceil(3 * sigma_y))
        xs = np.arange(max(0, cell_x - radius_x), min(out_w, cell_x + radius_x + 1))
        ys = np.arange(max(0, cell_y - radius_y), min(out_h, cell_y + radius_y + 1))
        gaussian = np.exp(
            -((xs[None, :] - cell_x) ** 2) / (2 * sigma_x**2) - ((ys[:, None] - cell_y) ** 2) / (2 * sigma_y**2)
        ).astype(np.float32)
        region = heatmap[cls, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
        np.maximum(region, gaussian, out=region)
        heatmap[cls, cell_y, cell_x] = 1.0
        log_size[:, cell_y, cell_x] = (math.log(width / OUTPUT_STRIDE), math.log(height / OUTPUT_STRIDE))
        offset[:, cell_y, cell_x] = (centre_x - cell_x, centre_y - cell_y)
        mask[cell_y, cell_x] = 1.0
    return heatmap, log_size, offset, mask


class CropSampler:
    """Random crops of the model views with JPEG and flip augmentation, as CenterNet targets."""

    def __init__(self, views: Sequence[ModelView], crop_wh: tuple[int, int], jpeg_probability: float, seed: int) -> None:
        self.views = views
        self.crop_wh = crop_wh
        self.jpeg_probability = jpeg_probability
        self.rng = np.random.default_rng(seed)
        # Images with more labels are drawn more often: most side-camera frames are empty road.
        weights = np.array([1.0 + min(len(view.boxes), 30) for view in views])
        self.weights = weights / weights.sum()

    def sample(self, batch_size: int, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, ...]:
        images, heatmaps, log_sizes, offsets, masks = [], [], [], [], []
        for view_index in self.rng.choice(len(self.views), size=batch_size, p=self.weights):
            view = self.views[view_index]
            height, width = view.image.shape[:2]
            crop_w, crop_h = min(self.crop_wh[0], width), min(self.crop_wh[1], height)
            left = int(self.rng.integers(0, width - crop_w + 1))
            top = int(self.rng.integers(0, height - crop_h + 1))
            crop = view.image[top : top + crop_h, left : left + crop_w]
            boxes = view.boxes - np.array([left, top, left, top], np.float32)
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = (centres[:, 0] >= 0) & (centres[:, 0] < crop_w) & (centres[:, 1] >= 0) & (centres[:, 1] < crop_h)
            boxes, classes = boxes[inside], view.class_index[inside]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
                boxes = np.stack([crop_w - boxes[:, 2], boxes[:, 1], crop_w - boxes[:, 0], boxes[:, 3]], axis=1)
            if self.rng.random() < self.jpeg_probability:
                quality = int(self.rng.integers(50, 96))
                ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(crop), [cv2.IMWRITE_JPEG_QUALITY, quality])
                crop = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
            crop = np.ascontiguousarray(crop)
            targets = _draw_targets(boxes, classes, (crop_w // OUTPUT_STRIDE, crop_h // OUTPUT_STRIDE), len(FAMILY_CLASS_MAP))
            images.append(((crop.astype(np.float32) - mean) / std).transpose(2, 0, 1))
            heatmaps.append(targets[0])
            log_sizes.append(targets[1])
            offsets.append(targets[2])
            masks.append(targets[3])
        return tuple(np.stack(part) for part in (images, heatmaps, log_sizes, offsets, masks))


# ----------------------------------------------------------------------------- training


def centernet_loss(outputs, heatmap, log_size, offset, mask):
    """Penalty-reduced focal loss on heatmaps + L1 on log size and offset at centres."""
    import torch
    from torch.nn import functional

    heatmap_logits, predicted_log_size, predicted_offset = outputs
    log_p = functional.logsigmoid(heatmap_logits)
    log_not_p = functional.logsigmoid(-heatmap_logits)
    probability = torch.sigmoid(heatmap_logits)
    positive = (heatmap == 1.0).float()
    positive_loss = -(log_p * (1 - probability) ** 2 * positive).sum()
    negative_loss = -(log_not_p * probability**2 * (1 - heatmap) ** 4 * (1 - positive)).sum()
    num_objects = positive.sum().clamp(min=1.0)
    centres = mask.unsqueeze(1)
    size_loss = (functional.l1_loss(predicted_log_size, log_size, reduction="none") * centres).sum() / num_objects
    offset_loss = (functional.l1_loss(predicted_offset, offset, reduction="none") * centres).sum() / num_objects
    return (positive_loss + negative_loss) / num_objects + size_loss + offset_loss


def _write_model(network, name: str, place: str, out_dir: Path, metrics: dict[str, float] | None = None) -> ModelCard:
    import torch

    from avcloud.models.centernet import MAX_DETECTIONS, export_onnx

    spec = network.spec
    out_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(network, out_dir / f"{name}.onnx")
    torch.save(network.state_dict(), out_dir / f"{name}.pt")
    card = ModelCard(
        name=name,
        onnx=f"{name}.onnx",
        input_width=spec.input_width,
        input_height=spec.input_height,
        channel_order="bgr",
        mean=NORMALISATION_MEAN,
        std=NORMALISATION_STD,
        class_map=dict(FAMILY_CLASS_MAP),
        output=OutputConvention(format="xyxy_score_class", boxes="input_pixels", score_threshold=0.05,
                                max_detections=MAX_DETECTIONS),
        place=place,
        torch=TorchWeights(architecture="centernet-lite", weights=f"{name}.pt", spec=spec.to_dict()),
        description=(
            f"avcloud CenterNet-lite, {spec.input_width}x{spec.input_height} input, stride-4 heads, "
            "decoding (3x3 max-pool peaks + top-100) in the graph; trained on synthetic scenes (seeds != 0)"
        ),
        metrics=metrics or {},
    )
    save_card(card, out_dir / f"{name}.yaml")
    return card


# Layers a fine-tune may add to trained weights: they are zero-initialised, so the network
# starts out computing what the trained one did.
_ADDABLE_LAYER_PREFIXES = ("stage32.", "lateral32.")


def load_initial_weights(network, weights_path: Path) -> None:
    """Load trained weights; only the addable stride-32 stage may be missing from them."""
    import torch

    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensor shapes differ
        first_line = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"{weights_path}: weights do not fit {network.spec} ({first_line})") from None
    not_addable = [key for key in missing if not key.startswith(_ADDABLE_LAYER_PREFIXES)]
    if unexpected or not_addable:
        raise UserError(
            f"{weights_path}: weights do not fit {network.spec} "
            f"(missing {not_addable[:3]}, unexpected {unexpected[:3]})"
        )


def train_model(
    name: str,
    preset: TrainingPreset,
    pool: Sequence[PoolImage],
    out_dir: Path,
    steps: int | None = None,
    report: Callable[[str, int, int, float], None] | None = None,
    threads: int = 1,
    checkpoint_every: int = 250,
    initial_weights: Path | None = None,
) -> ModelCard:
    """Train one family member and write its ONNX, torch weights and card to out_dir.

    Every `checkpoint_every` steps the whole training state goes to out_dir/<name>.checkpoint
    (atomically); a later call with the same settings resumes from it, so an interrupted
    training loses at most that many steps. The checkpoint is removed once the model is written.
    """
    import torch

    from avcloud.models.centernet import build_network

    place, spec = FAMILY[name]
    total_steps = preset.steps if steps is None else steps
    torch.set_num_threads(threads)
    torch.manual_seed(sorted(FAMILY).index(name) + 1)
    network = build_network(spec)
    if initial_weights is not None:
        # Fine-tuning (e.g. after the synthetic renderer changed) starts from trained weights.
        load_initial_weights(network, initial_weights)
    network.train()
    crop_wh, batch_size = preset.crop_and_batch_for(name)
    sampler = CropSampler(model_views(pool, spec), crop_wh, preset.jpeg_probability,
                          seed=sorted(FAMILY).index(name) + 1)
    optimiser = torch.optim.AdamW(network.parameters(), lr=preset.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=preset.learning_rate, total_steps=max(total_steps, 1), pct_start=0.1
    )
    mean = np.asarray(NORMALISATION_MEAN, np.float32)
    std = np.asarray(NORMALISATION_STD, np.float32)
    smoothed_loss = float("nan")
    checkpoint_path = out_dir / f"{name}.checkpoint"
    identity = {"spec": spec.to_dict(), "preset": repr(preset), "total_steps": total_steps}
    first_step = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state.get("identity") == identity:
            network.load_state_dict(state["network"])
            optimiser.load_state_dict(state["optimiser"])
            schedule.load_state_dict(state["schedule"])
            sampler.rng.bit_generator.state = state["sampler_rng"]
            first_step, smoothed_loss = state["step"], state["smoothed_loss"]
    for step in range(first_step, total_steps):
        batch = [torch.from_numpy(part) for part in sampler.sample(batch_size, mean, std)]
        images, heatmap, log_size, offset, mask = batch
        loss = centernet_loss(network(images), heatmap, log_size, offset, mask)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        smoothed_loss = value if math.isnan(smoothed_loss) else 0.95 * smoothed_loss + 0.05 * value
        if report is not None:
            report(name, step + 1, total_steps, smoothed_loss)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            out_dir.mkdir(parents=True, exist_ok=True)
            state = {"identity": identity, "network": network.state_dict(), "optimiser": optimiser.state_dict(),
                     "schedule": schedule.state_dict(), "sampler_rng": sampler.rng.bit_generator.state,
                     "step": step + 1, "smoothed_loss": smoothed_loss}
            torch.save(state, checkpoint_path.with_suffix(".partial"))
            os.replace(checkpoint_path.with_suffix(".partial"), checkpoint_path)
    network.eval()
    card = _write_model(network, name, place, out_dir)
    checkpoint_path.unlink(missing_ok=True)
    return card


def _train_worker(
    name: str, preset: TrainingPreset, pool_path: str, out_dir: str, steps: int | None, queue, initial_dir: str | None
) -> str:
    with open(pool_path, "rb") as stream:
        pool = pickle.load(stream)
    last_report = [0.0]

    def report(model: str, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last_report[0] > 1.0 or step == total:
            last_report[0] = now
            queue.put((model, step, total, loss))

    initial_weights = Path(initial_dir) / f"{name}.pt" if initial_dir else None
    train_model(name, preset, pool, Path(out_dir), steps, report, initial_weights=initial_weights)
    return name


def train_family(
    preset_name: str = "zoo",
    steps: int | None = None,
    out_dir: str | Path | None = None,
    models: Sequence[str] | None = None,
    workers: int = 2,
    progress: bool = True,
    initial_dir: str | Path | None = None,
) -> list[ModelCard]:
    """Train the family (every model in parallel processes, one thread each) and write it to out_dir."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from avcloud.models.cards import load_card
    from avcloud.models.zoo import SHIPPED_DIR

    if preset_name not in PRESETS:
        raise UserError(f"unknown training preset '{preset_name}' (known: {', '.join(PRESETS)})")
    preset = PRESETS[preset_name]
    names = list(models) if models else list(FAMILY)
    for name in names:
        if name not in FAMILY:
            raise UserError(f"unknown family model '{name}' (known: {', '.join(FAMILY)})")
    out_path = Path(out_dir) if out_dir is not None else SHIPPED_DIR
    for name in names if initial_dir is not None else []:
        if not (Path(initial_dir) / f"{name}.pt").is_file():
            raise UserError(f"{Path(initial_dir) / f'{name}.pt'}: no torch weights to start {name} from")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        render_task = bar.add_task("render training frames", total=1, loss="")
        pool = training_pool(preset, workers, lambda done, total: bar.update(render_task, completed=done, total=total))
        bar.update(render_task, completed=1, total=1)
        pool_path = cache_dir() / "training" / f"pool-{preset_name}-{os.getpid()}.pkl"
        with pool_path.open("wb") as stream:
            pickle.dump(pool, stream)
        total_steps = preset.steps if steps is None else steps
        tasks = {name: bar.add_task(f"train {name}", total=total_steps, loss="") for name in names}
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            queue = manager.Queue()
            executor = ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=serve_the_parent_only)
            try:
                # Largest first, so the two workers finish at about the same time.
                by_cost = sorted(names, key=lambda name: -FAMILY[name][1].input_width)
                futures = [
                    executor.submit(_train_worker, name, preset, str(pool_path), str(out_path), steps, queue,
                                    str(initial_dir) if initial_dir else None)
                    for name in by_cost
                ]
                while not all(future.done() for future in futures):
                    while not queue.empty():
                        model, step, total, loss = queue.get()
                        bar.update(tasks[model], completed=step, loss=f"loss {loss:.3f}")
                    time.sleep(0.5)
                for future in futures:
                    future.result()
                while not queue.empty():
                    model, step, total, loss = queue.get()
                    bar.update(tasks[model], completed=step, loss=f"loss {loss:.3f}")
            except BaseException:  # SIGINT, SIGTERM (avcloud.errors.Terminated) or a failed model
                stop_pool(executor)  # no training worker outlives the command
                pool_path.unlink(missing_ok=True)
                raise
            executor.shutdown(wait=True)
        pool_path.unlink(missing_ok=True)
    return [load_card(out_path / f"{name}.yaml") for name in names]


# ----------------------------------------------------------------------------- evaluation

# Object size buckets by box height in full-image pixels (KITTI/Waymo style: height decides detectability).
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<16px", 0.0, 16.0),
    ("16-48px", 16.0, 48.0),
    (">=48px", 48.0, math.inf),
)
RECALL_SCORE_THRESHOLD = 0.3
RECALL_IOU = 0.5


def held_out_images(frames_per_camera: int) -> list[tuple[np.ndarray, GroundTruth]]:
    """Raw frames of the held-out seed-0 segment, spread over its 200 frames, every camera."""
    from datasets.synthetic import render_camera

    frame_indices = np.linspace(0, 199, frames_per_camera).round().astype(int)
    return [render_camera(HELD_OUT_SEED, int(index), camera) for index in frame_indices for camera in ALL_CAMERAS]


def recall_by_size(detections: Sequence[np.ndarray], truths: Sequence[GroundTruth]) -> dict[str, float]:
    """Fraction of labelled objects found (score >= 0.3, same class, IoU >= 0.5), per height bucket."""
    from datasets.metric import pairwise_iou

    found = {name: 0 for name, _, _ in SIZE_BUCKETS}
    total = {name: 0 for name, _, _ in SIZE_BUCKETS}
    for image_detections, truth in zip(detections, truths, strict=True):
        confident = image_detections[image_detections[:, 4] >= RECALL_SCORE_THRESHOLD]
        heights = truth.boxes_xyxy[:, 3] - truth.boxes_xyxy[:, 1]
        matched = np.zeros(len(truth), bool)
        if len(confident) and len(truth):
            overlap = pairwise_iou(truth.boxes_xyxy, confident[:, :4])
            same_class = truth.classes[:, None] == confident[None, :, 5].astype(np.int32)
            matched = ((overlap >= RECALL_IOU) & same_class).any(axis=1)
        for name, low, high in SIZE_BUCKETS:
            in_bucket = (heights >= low) & (heights < high)
            found[name] += int(matched[in_bucket].sum())
            total[name] += int(in_bucket.sum())
    return {name: found[name] / total[name] if total[name] else math.nan for name, _, _ in SIZE_BUCKETS}


def evaluate_family(
    models: Sequence[str] | None = None, frames_per_camera: int = 10, backend: str = "onnxruntime"
) -> dict[str, dict]:
    """Raw-input mAP, AP per class, recall per size bucket and inference time on held-out frames."""
    from avcloud.models import Detector
    from datasets.metric import evaluate

    images = held_out_images(frames_per_camera)
    truths = [truth for _, truth in images]
    report = {}
    for name in models or list(FAMILY):
        detector = Detector.load(name, backend, num_threads=1)
        detector.warmup()
        started = time.perf_counter()
        detections = [detector.detect(image) for image, _ in images]
        inference_ms = (time.perf_counter() - started) * 1000.0 / len(images)
        result = evaluate(detections, truths)
        report[name] = {
            "map": result.map,
            "ap_per_class": result.ap_per_class,
            "recall_by_size": recall_by_size(detections, truths),
            "objects_by_size": {
                bucket: int(sum(((t.boxes_xyxy[:, 3] - t.boxes_xyxy[:, 1] >= low) &
                                 (t.boxes_xyxy[:, 3] - t.boxes_xyxy[:, 1] < high)).sum() for t in truths))
                for bucket, low, high in SIZE_BUCKETS
            },
            "inference_ms": inference_ms,
        }
    return report
