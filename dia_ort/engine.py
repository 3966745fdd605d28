"""ONNX Runtime sessions for one exported variant on one device, and the cache rows a batch runs on
there.

A batch's caches have one owner: host rows on the CPU (batching.py), `DeviceRows` here on CUDA: the
cross-attention K/V from the encoder and the self-attention buffers. Each cache buffer is bound as
both the step's `past_*` input and its `present_*` output, so the graph's ScatterND writes the new
rows in place; only the logits come back to the host. `DeviceRows` keeps every input and output of a
one-row step at a fixed address, which is what lets ONNX Runtime capture the step as a CUDA graph and
replay it (`use_torch_compile=True` on CUDA).
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.config import ModelConfig
from dia_ort.integer_gemm import graph_file
from dia_ort.manifest import Manifest, cache_names, cross_names
from dia_ort.recent import Recent

log = logging.getLogger(__name__)

# A graph tensor type -> (numpy storage dtype, ONNX element type). numpy has no bfloat16, so its
# buffers are held as uint16 bits.
TENSOR_TYPES = {
    "tensor(float)": (np.float32, 1),
    "tensor(float16)": (np.float16, 10),
    "tensor(bfloat16)": (np.uint16, 16),
    "tensor(int64)": (np.int64, 7),
    "tensor(bool)": (np.bool_, 9),
}
CACHE_GROWTH = 64  # a host cache buffer's slots are a multiple of this
UNCONDITIONAL_ROWS_BYTES = 128 * 2**20  # unconditional rows' cross K/V kept by length (batching.py)
GRAPH_ID_OPTION = "gpu_graph_id"  # ONNX Runtime's run option naming the CUDA graph to capture or replay
NO_GRAPH = "-1"  # ... and its value for a run that is neither captured nor replayed


def graph_run_options(graph_id: str) -> ort.RunOptions:
    """Run options naming the CUDA graph a run captures or replays (NO_GRAPH: neither)."""
    options = ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID_OPTION, graph_id)
    return options


def _get_default_device() -> str:
    """The best available device: "cuda" when ONNX Runtime has the CUDA provider, else "cpu"."""
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


# cuDNN picks each convolution's algorithm from its heuristics instead of timing the candidates
# (ONNX Runtime's default, EXHAUSTIVE). On an H200 with onnxruntime-gpu 1.31.1, the full DAC decoder on
# one 431-frame window ran in 22.4 ms a call with HEURISTIC against 74.4 ms with EXHAUSTIVE, after the
# first call; with EXHAUSTIVE, the codec decoding 5 s of audio on its grid of windows of 7 widths
# took 3.5 s (bench/RESULTS-cuda.md).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


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

    def providers(self, cuda_graph: bool = False) -> list:
        if self.kind == "cuda":
            options = {"device_id": self.index, **CUDA_OPTIONS}
            options |= {"enable_cuda_graph": "1"} if cuda_graph else {}
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def zeros(self, shape: tuple[int, ...], tensor_type: str) -> ort.OrtValue:
        """A zero-filled tensor of a graph tensor type ("tensor(float)", ...) on this device."""
        storage, element = TENSOR_TYPES[tensor_type]
        zeros = np.zeros(shape, dtype=storage)
        if storage is not np.uint16:  # a numpy type: the common path
            return ort.OrtValue.ortvalue_from_numpy(zeros, self.kind, self.index)
        if self.kind == "cpu":
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(zeros, element)  # bfloat16 bits
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, element, self.kind, self.index)
        value.update_inplace(zeros)  # a copy of the bytes
        return value


def open_session(path: Path, device: Device, cuda_graph: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device.threads:
        options.intra_op_num_threads = device.threads
    return ort.InferenceSession(str(path), sess_options=options, providers=device.providers(cuda_graph))


def open_sessions(paths: list[Path], device: Device) -> list[ort.InferenceSession]:
    """Sessions for `paths`, built at once: most of a session's start is ONNX Runtime prepacking its
    weights, which it does without holding the GIL, so the sessions build on all cores together."""
    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(lambda path: open_session(path, device), paths))


def grown_capacity(needed: int, limit: int) -> int:
    """Slots of a host cache buffer that must hold `needed` rows: `needed` and an eighth more, up to a
    multiple of CACHE_GROWTH, at most `limit`.

    The step attends over every slot of its buffer, and growing copies the whole buffer, so the room
    kept ahead balances the two: a few dozen unread slots early on (a 16-request step at position 20
    reads 64 slots a row where 256 cost it 1.22x), and a copy once per eighth of a long cache."""
    return min(limit, -(-(needed + needed // 8) // CACHE_GROWTH) * CACHE_GROWTH)


def check_window(config: ModelConfig, slots: int) -> None:
    """Refuse a cache longer than the model's audio window: RoPE's tables in the graph end there."""
    if slots > config.audio_length:
        raise ValueError(f"the model's audio window holds {config.audio_length} rows, asked for {slots}")


class Engine:
    """The text encoder and decoder-step sessions of one precision variant."""

    def __init__(self, folder: Path, manifest: Manifest, dtype: str, device: Device) -> None:
        graphs = manifest.variants[dtype]
        self.config = manifest.model
        self.frame_rate = manifest.codec_config.frame_rate  # decoder rows in one second of audio
        self.device = device
        self.dtype = dtype
        on_cpu = device.kind == "cpu"
        self.step_path = folder / graph_file(graphs["decoder_step"], on_cpu)
        self.encoder, self.step = open_sessions(
            [folder / graph_file(graphs["encoder"], on_cpu), self.step_path], device
        )
        self.cuda_graph = False  # whether `step` was opened with CUDA graphs enabled
        self.cuda_graph_error: str | None = None  # why ONNX Runtime refused to, once it did
        # held to run a CUDA graph session (never from two threads at once) and to take fixed buffers
        self.graph_lock = threading.Lock()
        types = {value.name: value.type for value in self.step.get_inputs()}
        self.cache_type = types["past_key_0"]
        self.cross_type = types["cross_key_0"]
        self.buffers: list[StepBuffers] = []  # DeviceRows' buffers, newest last
        # HostRows' unconditional rows by text length: each layer's key and value `[1, H, L, D]` (full
        # shape: 295 KB a text byte, so 128 MB keeps 4 texts of 100 bytes, and none over 455)
        self.unconditional_rows: Recent[int, list[np.ndarray]] = Recent(
            64, weigh=lambda kv: sum(a.nbytes for a in kv), budget=UNCONDITIONAL_ROWS_BYTES
        )
        self.graph_ids = itertools.count(1)  # never reused: a dropped id's graph points at freed memory

    def _enable_cuda_graph(self) -> bool:
        """Reopen the step with CUDA graphs enabled; False, for good, where ONNX Runtime refuses.

        ONNX Runtime refuses a graph that needs host-device copies inside it. The plain session stays
        until the new one is open, so a refusal leaves the engine as it was.
        """
        if self.cuda_graph_error is None:
            log.info("reopening the decoder step with CUDA graph capture enabled")
            try:
                session = open_session(self.step_path, self.device, cuda_graph=True)
            except Exception as exc:  # ONNX Runtime's own exception types (Fail, RuntimeException, ...)
                self.cuda_graph_error = f"{type(exc).__name__}: {exc}"
            else:
                self.step, self.cuda_graph = session, True
                return True
        log.warning("CUDA graph capture is off (%s); running the plain step loop", self.cuda_graph_error)
        return False

    def step_buffers(self, batch: int, text_length: int, slots: int) -> StepBuffers:
        """Free fixed buffers for this shape: reused when a finished request left some, else new.

        Each set of buffers has its own CUDA graph id, since a graph replays on the addresses it was
        captured with; ONNX Runtime keeps every captured graph until the session closes. Buffers in
        use by a live request are never shared; at most MAX_FREE_BUFFERS free sets are kept, this new
        one counted.
        """
        key = (batch, text_length, slots)
        for buffers in self.buffers:
            if buffers.key == key and not buffers.in_use:
                self.buffers.remove(buffers)
                self.buffers.append(buffers)
                return buffers
        free = [b for b in self.buffers if not b.in_use]
        for stale in free[: max(0, len(free) - StepBuffers.MAX_FREE_BUFFERS + 1)]:
            self.buffers.remove(stale)
        buffers = StepBuffers.allocate(self, key, next(self.graph_ids))
        self.buffers.append(buffers)
        return buffers


def encode_rows(
    engine: Engine, text_ids: np.ndarray, text_mask: np.ndarray, cross: list[ort.OrtValue] | None
) -> list[ort.OrtValue]:
    """Run the encoder into `cross` (fixed buffers), or into new device tensors when None."""
    binding = engine.encoder.io_binding()
    binding.bind_cpu_input("text_ids", np.ascontiguousarray(text_ids, dtype=np.int64))
    binding.bind_cpu_input("text_mask", np.ascontiguousarray(text_mask, dtype=bool))
    for i, name in enumerate(cross_names(engine.config.decoder_layers)):
        if cross is None:
            binding.bind_output(name, engine.device.kind, engine.device.index)
        else:
            binding.bind_ortvalue_output(name, cross[i])
    engine.encoder.run_with_iobinding(binding)
    return cross if cross is not None else binding.get_outputs()


def bind_caches(binding: ort.IOBinding, caches: list[ort.OrtValue], layers: int) -> None:
    """Bind each cache buffer as both its `past_*` input and its `present_*` output (updated in place)."""
    past, present = cache_names("past", layers), cache_names("present", layers)
    for past_name, present_name, value in zip(past, present, caches, strict=True):
        binding.bind_ortvalue_input(past_name, value)
        binding.bind_ortvalue_output(present_name, value)


@dataclass(eq=False)
class StepBuffers:
    """Every input and output of a one-row decoder step, at addresses fixed for a CUDA graph.

    A captured graph replays on the memory it was captured with, so requests of one shape (batch
    rows, text length, slots) reuse one set: the encoder writes into `cross`, and each step copies
    its tokens and position into `tokens` and `positions`.
    """

    MAX_FREE_BUFFERS = 2

    key: tuple[int, int, int]
    graph_id: int
    tokens: ort.OrtValue  # [B, 1, C] int64
    positions: ort.OrtValue  # [B, 1] int64
    text_mask: ort.OrtValue  # [B, L] bool
    cross: list[ort.OrtValue]
    caches: list[ort.OrtValue]
    logits: ort.OrtValue  # [B, C, V] float32
    in_use: bool = False  # taken by a batch, until its `DeviceRows.close`

    @classmethod
    def allocate(cls, engine: Engine, key: tuple[int, int, int], graph_id: int) -> StepBuffers:
        config, device = engine.config, engine.device
        batch, text_length, slots = key
        layers = config.decoder_layers

        cross_shape = (batch, config.cross_heads, text_length, config.cross_head_dim)
        cache_shape = (batch, config.kv_heads, slots, config.head_dim)
        return cls(
            key=key,
            graph_id=graph_id,
            tokens=device.zeros((batch, 1, config.num_channels), "tensor(int64)"),
            positions=device.zeros((batch, 1), "tensor(int64)"),
            text_mask=device.zeros((batch, text_length), "tensor(bool)"),
            cross=[device.zeros(cross_shape, engine.cross_type) for _ in range(2 * layers)],
            caches=[device.zeros(cache_shape, engine.cache_type) for _ in range(2 * layers)],
            logits=device.zeros((batch, config.num_channels, config.vocab_size), "tensor(float)"),
        )


class DeviceRows:
    """A fixed batch's cache rows on fixed device buffers: what runs on CUDA, where a one-row step
    replays a captured CUDA graph when `graph` (the seed API's `use_torch_compile`).

    A captured graph replays on the memory it was captured with, so batches of one shape (rows, text
    length, slots) reuse one set of the engine's `StepBuffers`: the text is padded to a multiple of
    TEXT_BUCKET bytes (masked, so the result is unchanged) and the slots to a multiple of SLOT_BUCKET.
    Device memory cannot be sliced from the host, so the rows stay where they are: a batch's requests
    take them in one `add`, one that leaves keeps its rows, held, until the batch ends, and a prefill
    of some rows runs every row, the others held. A held row is fed at its own position, which its
    next step overwrites before anything reads it. On the CPU the same protocol runs without capture
    (tests use that).
    """

    TEXT_BUCKET = 64
    SLOT_BUCKET = 256

    def __init__(self, engine: Engine, max_rows: int, slots: int, graph: bool) -> None:
        check_window(engine.config, slots)
        if graph and engine.device.kind == "cuda" and not engine.cuda_graph:
            graph = engine._enable_cuda_graph()
        self.engine, self.max_rows, self.slots, self.graph = engine, max_rows, slots, graph
        self.rows = 0
        self.positions = np.zeros(max_rows, dtype=np.int64)  # the next position of each row
        self.buffers: StepBuffers | None = None
        self.uncaptured = graph_run_options(NO_GRAPH)

    def add(self, text_ids: np.ndarray, text_mask: np.ndarray) -> int:
        """Encode the batch's `[max_rows, L]` text rows into its buffers; its rows start at 0."""
        if self.rows or text_ids.shape[0] != self.max_rows:
            raise ValueError(
                f"a batch on device rows takes its {self.max_rows} rows at once (continuous batching "
                f"runs on host rows); got {text_ids.shape[0]} rows with {self.rows} taken"
            )
        engine, config = self.engine, self.engine.config
        batch, length = text_ids.shape
        padded = min(max(length, config.text_length), -(-length // self.TEXT_BUCKET) * self.TEXT_BUCKET)
        text_ids = np.pad(text_ids, ((0, 0), (0, padded - length)))
        text_mask = np.pad(np.asarray(text_mask, dtype=bool), ((0, 0), (0, padded - length)))
        with engine.graph_lock:  # two batches starting at once must not take the same free buffers
            buffers = engine.step_buffers(
                batch, padded, -(-self.slots // self.SLOT_BUCKET) * self.SLOT_BUCKET
            )
            buffers.in_use = True
        self.buffers = buffers  # `close` frees them, also when encoding fails
        encode_rows(engine, text_ids, text_mask, buffers.cross)
        buffers.text_mask.update_inplace(text_mask)
        self.session = engine.step
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_output("logits", buffers.logits)
        self.binding.bind_ortvalue_input("text_mask", buffers.text_mask)
        for name, value in zip(cross_names(config.decoder_layers), buffers.cross, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        bind_caches(self.binding, buffers.caches, config.decoder_layers)
        self.rows = batch
        self.replay = graph_run_options(str(buffers.graph_id) if self.graph else NO_GRAPH)
        self.prefilled = True  # the fixed one-row inputs are bound at the first one-row step
        return 0

    def remove(self, first: int) -> None:
        """A request left: its rows stay, held, until the batch ends (nothing moves)."""
        return None

    def close(self) -> None:
        """The batch has ended: its buffers are free for the next batch of this shape."""
        if self.buffers is not None:
            self.buffers.in_use = False

    def prefill(self, first: int, tokens: np.ndarray) -> np.ndarray:
        """Feed rows from `first` their next `[R, S, C]` known rows (every other row held); return their
        logits `[R, C, V]`."""
        count, rows = tokens.shape[:2]
        fed = np.zeros((self.rows, rows, tokens.shape[2]), dtype=np.int64)
        fed[first : first + count] = tokens
        positions = np.repeat(self.positions[: self.rows, None], rows, axis=1)
        positions[first : first + count] += np.arange(rows)
        logits = self._run(fed, positions)
        self.positions[first : first + count] += rows
        return logits[first : first + count]

    def step(self, tokens: np.ndarray, held: np.ndarray) -> np.ndarray:
        """Feed every row one `[rows, 1, C]` token row at its own position (`held` rows stay there);
        return `[rows, C, V]`."""
        logits = self._run(tokens, self.positions[: self.rows, None].copy())
        self.positions[: self.rows] += ~held
        return logits

    def _run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step-graph call; a one-row step on fixed inputs (replaying the captured graph)."""
        if int(positions.max()) >= self.slots:
            raise ValueError(
                f"cache holds {self.slots} rows, asked to write up to row {int(positions.max())}"
            )
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        with self.engine.graph_lock:
            if tokens.shape[1] == 1:
                if self.prefilled:
                    self.binding.bind_ortvalue_input("tokens", self.buffers.tokens)
                    self.binding.bind_ortvalue_input("positions", self.buffers.positions)
                    self.prefilled = False
                self.buffers.tokens.update_inplace(tokens)
                self.buffers.positions.update_inplace(positions)
                self.session.run_with_iobinding(self.binding, self.replay)
            else:
                self.binding.bind_cpu_input("tokens", tokens)
                self.binding.bind_cpu_input("positions", positions)
                self.prefilled = True
                self.session.run_with_iobinding(self.binding, self.uncaptured)
            return np.array(self.buffers.logits.numpy())  # the buffer is rewritten next step
