"""Inference backends behind one interface: onnxruntime (CPU, CUDA, TensorRT providers), native
TensorRT, and torch.

A backend turns an input batch (already resized and normalised, in the card's layout and
dtype) into the model's raw output arrays, in the graph's output order. Which one runs is chosen by name; "auto" picks the fastest available. A missing
GPU, library or provider never crashes: the selection falls back to onnxruntime on the CPU
with a warning, and one info line says what runs.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol

import numpy as np

from avcloud.errors import ConfigError
from avcloud.models.cards import ModelCard
from avcloud.paths import cache_dir

log = logging.getLogger("avcloud.models")

BACKEND_NAMES = ("auto", "onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (library, provider or GPU missing)."""


class InferenceBackend(Protocol):
    name: str  # e.g. "onnxruntime[CPUExecutionProvider]"
    output_names: tuple[str, ...]

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph for this batch, in the graph's order."""
        ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output (the one the `xyxy_score_class` convention reads)."""
        ...


def _stack_single_batches(per_image: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Outputs of a fixed-batch-1 graph run image by image, joined along a batch axis."""
    joined = []
    for index in range(len(per_image[0])):
        parts = [np.asarray(outputs[index]) for outputs in per_image]
        if parts[0].ndim >= 1 and parts[0].shape[0] == 1:
            joined.append(np.concatenate(parts, axis=0))
        else:  # e.g. [K, 6] rows without a batch axis
            joined.append(np.stack(parts))
    return joined


def _available_ort_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


class OnnxRuntimeBackend:
    """onnxruntime with an ordered provider list; CPU is always appended as the last resort."""

    def __init__(self, card: ModelCard, providers: list[str], num_threads: int | None = None) -> None:
        import onnxruntime

        available = _available_ort_providers()
        missing = [provider for provider in providers if provider not in available]
        if missing:
            raise BackendUnavailable(f"onnxruntime provider(s) {', '.join(missing)} not available here")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        chain = list(providers) + (["CPUExecutionProvider"] if "CPUExecutionProvider" not in providers else [])
        try:
            self.session = onnxruntime.InferenceSession(str(card.onnx_path), options, providers=chain)
        except Exception as error:  # onnxruntime raises its own exception types for bad files
            raise ConfigError(f"{card.onnx_path}: onnxruntime cannot load it ({error})") from None
        active = self.session.get_providers()
        if providers and providers[0] not in active:
            raise BackendUnavailable(f"onnxruntime could not start {providers[0]}")
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_names = tuple(output.name for output in self.session.get_outputs())
        # A graph exported with a fixed batch of 1 is run one image at a time.
        self.fixed_single_batch = model_input.shape[0] == 1
        self.name = f"onnxruntime[{active[0]}]"

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.fixed_single_batch and batch.shape[0] > 1:
            return _stack_single_batches(
                [self.session.run(None, {self.input_name: batch[i : i + 1]}) for i in range(batch.shape[0])]
            )
        return list(self.session.run(None, {self.input_name: batch}))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch)[0]


# TensorRT tensor dtype name -> torch dtype name, for the output buffers.
_TORCH_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
                      "UINT8": "uint8", "INT8": "int8"}


class TensorRTBackend:
    """Native TensorRT: builds an engine from the ONNX once and caches it under cache_dir()/tensorrt.

    I/O buffers are torch CUDA tensors (torch is already a dependency), so no pycuda is needed.
    """

    def __init__(self, card: ModelCard, max_batch: int = 8) -> None:
        try:
            import tensorrt
            import torch
        except (ImportError, OSError) as error:
            raise BackendUnavailable(f"tensorrt cannot be imported ({error})") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt needs a CUDA GPU and none is visible")
        self._torch = torch
        logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        onnx_bytes = card.onnx_path.read_bytes()
        digest = hashlib.sha256(onnx_bytes + tensorrt.__version__.encode()).hexdigest()[:16]
        engine_path = cache_dir() / "tensorrt" / f"{card.name}-{digest}.engine"
        runtime = tensorrt.Runtime(logger)
        if engine_path.exists():
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        else:
            engine_bytes = self._build_engine(tensorrt, logger, onnx_bytes, card, max_batch)
            engine_path.parent.mkdir(parents=True, exist_ok=True)
            engine_path.write_bytes(engine_bytes)
            engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise BackendUnavailable("tensorrt could not deserialize the engine")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        inputs = [name for name in names if engine.get_tensor_mode(name) == tensorrt.TensorIOMode.INPUT]
        self.input_name = inputs[0]
        self.output_names = tuple(name for name in names if name not in inputs)
        self.name = "tensorrt"

    @staticmethod
    def _build_engine(tensorrt, logger, onnx_bytes: bytes, card: ModelCard, max_batch: int) -> bytes:
        builder = tensorrt.Builder(logger)
        network = builder.create_network(0)
        parser = tensorrt.OnnxParser(network, logger)
        if not parser.parse(onnx_bytes):
            raise BackendUnavailable(f"tensorrt cannot parse {card.onnx_path}: {parser.get_error(0)}")
        config = builder.create_builder_config()
        if builder.platform_has_fast_fp16:
            config.set_flag(tensorrt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        input_name = network.get_input(0).name

        def image_shape(width: int, height: int) -> tuple[int, int, int]:
            return (height, width, 3) if card.channels_last else (3, height, width)

        shape = image_shape(card.input_width, card.input_height)
        # A multi-scale card runs the same engine at its extra passes' sizes too.
        sizes = [shape] + [image_shape(p.input_width, p.input_height)
                           for p in (card.multi_scale.passes if card.multi_scale else ())]
        smallest = tuple(min(size[axis] for size in sizes) for axis in range(3))
        largest = tuple(max(size[axis] for size in sizes) for axis in range(3))
        profile.set_shape(input_name, (1, *smallest), (1, *shape), (max_batch, *largest))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailable(f"tensorrt failed to build an engine for {card.onnx_path}")
        return bytes(serialized)

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        images = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        outputs = []
        for name in self.output_names:
            trt_dtype = str(self.engine.get_tensor_dtype(name)).split(".")[-1]
            dtype = getattr(torch, _TORCH_DTYPE_NAMES.get(trt_dtype, "float32"))
            output = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, output.data_ptr())
            outputs.append(output)
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return [output.cpu().numpy() for output in outputs]

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch)[0]


class TorchBackend:
    """Runs the card's native torch weights (the project's family ships them); GPU when present."""

    def __init__(self, card: ModelCard, num_threads: int | None = None) -> None:
        if card.torch is None or card.torch_weights_path is None:
            raise BackendUnavailable(f"model '{card.name}' ships no torch weights (card field 'torch')")
        try:
            import torch

            from avcloud.models.centernet import CenterNetSpec, DecodedCenterNet, load_network
        except (ImportError, OSError) as error:
            raise BackendUnavailable(f"torch cannot be imported ({error})") from None
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        network = load_network(card.torch_weights_path, CenterNetSpec(**card.torch.spec))
        self.module = DecodedCenterNet(network).eval().to(self.device)
        self.name = f"torch[{self.device}]"
        self.output_names = ("detections",)

    def run(self, batch_nchw: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            output = self.module(torch.from_numpy(np.ascontiguousarray(batch_nchw)).to(self.device))
        return output.float().cpu().numpy()

    def run_outputs(self, batch_nchw: np.ndarray) -> list[np.ndarray]:
        return [self.run(batch_nchw)]


def _construct(card: ModelCard, backend: str, num_threads: int | None) -> InferenceBackend:
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(card, ["CPUExecutionProvider"], num_threads)
    if backend == "onnxruntime-cuda":
        return OnnxRuntimeBackend(card, ["CUDAExecutionProvider"], num_threads)
    if backend == "onnxruntime-tensorrt":
        return OnnxRuntimeBackend(card, ["TensorrtExecutionProvider", "CUDAExecutionProvider"], num_threads)
    if backend == "tensorrt":
        return TensorRTBackend(card)
    if backend == "torch":
        return TorchBackend(card, num_threads)
    raise ConfigError(f"unknown inference backend '{backend}' (known: {', '.join(BACKEND_NAMES)})")


def _auto_order() -> list[str]:
    providers = _available_ort_providers()
    order = ["tensorrt"]
    if "TensorrtExecutionProvider" in providers:
        order.append("onnxruntime-tensorrt")
    if "CUDAExecutionProvider" in providers:
        order.append("onnxruntime-cuda")
    return order


def open_backend(card: ModelCard, backend: str = "auto", num_threads: int | None = None) -> InferenceBackend:
    """Open the requested backend, falling back (with a warning) to onnxruntime on the CPU."""
    if backend not in BACKEND_NAMES:
        raise ConfigError(f"unknown inference backend '{backend}' (known: {', '.join(BACKEND_NAMES)})")
    candidates = _auto_order() if backend == "auto" else [backend]
    for candidate in candidates:
        if candidate == "onnxruntime":
            break
        try:
            opened = _construct(card, candidate, num_threads)
        except BackendUnavailable as reason:
            level = logging.DEBUG if backend == "auto" else logging.WARNING
            log.log(level, "model %s: backend %s unavailable (%s); falling back", card.name, candidate, reason)
            continue
        log.info("model %s: inference backend %s", card.name, opened.name)
        return opened
    opened = _construct(card, "onnxruntime", num_threads)
    log.info("model %s: inference backend %s", card.name, opened.name)
    return opened
