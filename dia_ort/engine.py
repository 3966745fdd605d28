"""ONNX Runtime sessions for one exported variant on one device, and the KV cache that steps them.

`DecoderState` is the one owner of a request's caches: the cross-attention K/V from the encoder and
the self-attention buffers, all `OrtValue`s on the device. Each cache buffer is bound as both the
step's `past_*` input and its `present_*` output, so the graph's ScatterND writes the new rows in
place; only the logits come back to the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.manifest import Manifest, cache_names, cross_names

log = logging.getLogger(__name__)

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _get_default_device() -> str:
    """The best available device: "cuda" when ONNX Runtime has the CUDA provider, else "cpu"."""
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


@dataclass(frozen=True)
class Device:
    """Where sessions run and tensors live: ("cpu", 0) or ("cuda", N), and how many CPU threads."""

    kind: str
    index: int = 0
    threads: int | None = None  # ONNX Runtime's intra-op threads; None: one per physical core

    @classmethod
    def parse(cls, device: object | None, threads: int | None = None) -> Device:
        if device is None:
            device = _get_default_device()
        text = str(device).strip().lower()  # also accepts a torch.device without importing torch
        kind, _, index = text.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if kind == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                f"device {device!r} asked for CUDA, but this onnxruntime has no CUDA provider "
                f"(available: {ort.get_available_providers()}); install `dia-ort[gpu]` or use device='cpu'"
            )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        return cls(kind, int(index or 0), threads)

    def providers(self) -> list:
        if self.kind == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.index}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def zeros(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), self.kind, self.index)


def open_session(path: Path, device: Device) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device.threads:
        options.intra_op_num_threads = device.threads
    return ort.InferenceSession(str(path), sess_options=options, providers=device.providers())


class Engine:
    """The text encoder and decoder-step sessions of one precision variant."""

    def __init__(self, folder: Path, manifest: Manifest, dtype: str, device: Device) -> None:
        graphs = manifest.variants[dtype]
        self.config = manifest.model
        self.device = device
        self.dtype = dtype
        self.encoder = open_session(folder / graphs["encoder"].file.path, device)
        self.step = open_session(folder / graphs["decoder_step"].file.path, device)
        inputs = {i.name: i for i in self.step.get_inputs()}
        self.cache_dtype = _ORT_TO_NUMPY[inputs["past_key_0"].type]

    def start(self, text_ids: np.ndarray, text_mask: np.ndarray, slots: int) -> DecoderState:
        """Encode `[B, L]` text rows and allocate `slots` cache rows for each of them."""
        return DecoderState(self, text_ids, text_mask, slots)


class DecoderState:
    """The caches of one request, bound once; `step` runs S rows and returns `[B, C, V]` logits.

    On the CPU the buffers start at GROWTH slots and grow by GROWTH when a step needs more (one copy
    per GROWTH steps), since the step attends over every slot of the buffer: early steps then read
    a small cache. On CUDA, where that read is cheap and a host copy is not, all slots are allocated
    at once.
    """

    GROWTH = 256

    def __init__(self, engine: Engine, text_ids: np.ndarray, text_mask: np.ndarray, slots: int) -> None:
        config, device = engine.config, engine.device
        self.engine = engine
        self.text_mask = np.ascontiguousarray(text_mask, dtype=bool)
        encoding = engine.encoder.io_binding()
        encoding.bind_cpu_input("text_ids", np.ascontiguousarray(text_ids, dtype=np.int64))
        encoding.bind_cpu_input("text_mask", self.text_mask)
        for name in cross_names(config.decoder_layers):
            encoding.bind_output(name, device.kind, device.index)
        engine.encoder.run_with_iobinding(encoding)
        self.cross = encoding.get_outputs()
        self.slots = slots
        self.binding = engine.step.io_binding()
        self.binding.bind_output("logits", "cpu")  # bound first: get_outputs() lists in binding order
        self.binding.bind_cpu_input("text_mask", self.text_mask)  # fixed for the whole request
        for name, value in zip(cross_names(config.decoder_layers), self.cross, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        self.host: list[np.ndarray] = []  # the CPU buffers behind the cache OrtValues
        self.capacity = 0
        self._allocate(slots if device.kind == "cuda" else min(slots, self.GROWTH), batch=text_ids.shape[0])

    def _allocate(self, capacity: int, batch: int) -> None:
        """Bind cache buffers of `capacity` slots, keeping the rows written so far."""
        config, device = self.engine.config, self.engine.device
        shape = (batch, config.kv_heads, capacity, config.head_dim)
        if device.kind == "cpu":
            fresh = [np.zeros(shape, dtype=self.engine.cache_dtype) for _ in range(2 * config.decoder_layers)]
            for old, new in zip(self.host, fresh[: len(self.host)], strict=True):  # none on the first call
                new[:, :, : self.capacity] = old
            self.host = fresh
            caches = [ort.OrtValue.ortvalue_from_numpy(array) for array in fresh]
        else:
            caches = [device.zeros(shape, self.engine.cache_dtype) for _ in range(2 * config.decoder_layers)]
        past = cache_names("past", config.decoder_layers)
        present = cache_names("present", config.decoder_layers)
        for past_name, present_name, value in zip(past, present, caches, strict=True):
            self.binding.bind_ortvalue_input(past_name, value)
            self.binding.bind_ortvalue_output(present_name, value)
        self.caches = caches
        self.capacity = capacity

    def step(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Feed `[B, S, C]` tokens at rows start..start+S-1; return the last row's logits `[B, C, V]`."""
        end = start + tokens.shape[1]
        if end > self.slots:
            raise ValueError(f"cache holds {self.slots} rows, asked to write up to row {end - 1}")
        if end > self.capacity:
            grown = -(-end // self.GROWTH) * self.GROWTH
            self._allocate(min(self.slots, grown), batch=tokens.shape[0])
        self.binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        self.binding.bind_cpu_input("positions", np.arange(start, end, dtype=np.int64))
        self.engine.step.run_with_iobinding(self.binding)
        return np.array(self.binding.get_outputs()[0].numpy())  # the bound buffer is reused next step
