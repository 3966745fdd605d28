"""`Dia2`: Dia2 speech from an exported folder, torch-free, with the reference's API shape.

`generate(script, config=GenerationConfig(...))` runs nari-labs/dia2's generation loop
(`runtime/generator.py` at 8687268; docs/dia2.md section 5) on the exported graphs: per frame the
backbone step for the conditional and unconditional rows, the text action through the state machine,
codebook 0, then each depformer stage (`frames.FrameLoop`); the codes are undelayed, cropped at the first
word and decoded by Mimi's streaming decoder in chunks as they become final (`stream`), which
`generate` joins.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.audio import load_audio
from dia_ort.dia2.batch import DecoderGraphs, FrameBatch
from dia_ort.dia2.frames import FrameLoop
from dia_ort.dia2.prefix import PrefixConfig, PrefixPlan, build_plan
from dia_ort.dia2.sampling import Draw, SamplingConfig, random_draw
from dia_ort.dia2.script import ScriptReader
from dia_ort.dia2.stage_weights import StageWeights
from dia_ort.dia2.state_machine import TokenIds
from dia_ort.dia2_config import Dia2Config
from dia_ort.engine import Device, open_sessions
from dia_ort.hub import resolve_model_folder
from dia_ort.integer_gemm import graph_file
from dia_ort.manifest import Manifest
from dia_ort.recent import Recent

CHUNK_FRAMES = 4  # frames a stream decodes at once (320 ms); `generate` joins the same chunks
PLANNED_PREFIXES = 16  # prefixes whose plan (the clips' codes and words) a model keeps, the last used


@dataclass(frozen=True)
class GenerationConfig:
    """The reference's generation settings (its defaults)."""

    text: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.6, top_k=50))
    audio: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8, top_k=50))
    cfg_scale: float = 2.0
    cfg_filter_k: int = 50
    initial_padding: int = 2

    def __post_init__(self) -> None:
        for name, stream in (("text", self.text), ("audio", self.audio)):
            if not isinstance(stream, SamplingConfig):
                raise TypeError(f"{name} must be a SamplingConfig, got {type(stream).__name__}")
            _check_number(f"{name}.temperature", stream.temperature, 0.0)
            _check_whole(f"{name}.top_k", stream.top_k)
        _check_number("cfg_scale", self.cfg_scale, 0.0)
        _check_whole("cfg_filter_k", self.cfg_filter_k)
        _check_whole("initial_padding", self.initial_padding)


def _check_number(name: str, value: object, minimum: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not np.isfinite(value)
        or value < minimum
    ):
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def _check_whole(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")


@dataclass(frozen=True)
class GenerationResult:
    """What `Dia2.generate` returns, as the reference's result does (numpy instead of torch)."""

    audio_tokens: np.ndarray  # [K, T] int64: the frames' codes, undelayed and cropped at the first word
    waveform: np.ndarray  # [N] float32 in [-1, 1]
    sample_rate: int
    timestamps: list[tuple[str, float]]  # each word and the second it starts at


class Tokenizer:
    """The checkpoint's tokenizer (`tokenizer.json`, through `tokenizers`) and the ids the machine needs."""

    def __init__(self, folder: Path, config: Dia2Config) -> None:
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(str(folder / "tokenizer.json"))
        settings_path = folder / "tokenizer_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        bos = settings.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = self.backend.token_to_id(bos) if bos else None

        def tag(name: str) -> int:
            found = self.backend.token_to_id(name)
            return config.text_new_word_id if found is None else found

        # the tag written before a prefix speaker's first word, by the speaker's id ([S1] wins a tie)
        self.tags = {
            id_: name for name in ("[S2]", "[S1]") if (id_ := self.backend.token_to_id(name)) is not None
        }
        self.ids = TokenIds(
            new_word=config.text_new_word_id,
            pad=config.text_pad_id,
            bos=bos_id or 1,  # the reference feeds `bos_token_id or 1`: a BOS of id 0 becomes 1
            zero=config.text_zero_id,
            spk1=tag("[S1]"),
            spk2=tag("[S2]"),
        )

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


class Dia2:
    """Dia2 text-to-dialogue on ONNX Runtime: a folder exported by `python -m export` (family dia2)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        device: object | None = None,
        threads: int | None = None,
        compute_dtype: str = "float32",
    ) -> None:
        """`compute_dtype`: the exported variant to run, "float32" or "int8" (`python -m export --quantize
        int8`: both decoder graphs on ONNX Runtime's integer GEMM, the fast one on a CPU)."""
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        if self.manifest.family != "dia2":
            raise ValueError(f"{self.folder} holds a {self.manifest.family} model; open it with dia_ort.Dia")
        if compute_dtype not in self.manifest.variants:
            raise ValueError(
                f"compute_dtype={compute_dtype!r}: this Dia2 folder has {sorted(self.manifest.variants)}; "
                f"export another with `python -m export --quantize int8 ...`"
            )
        self.compute_dtype = compute_dtype
        self.manifest.check_files(self.folder, compute_dtype)
        config = self.manifest.model
        assert isinstance(config, Dia2Config)
        self.config = config
        self.device = Device.parse(device, threads)
        self.tokenizer = Tokenizer(self.folder, config)
        self.sample_rate = self.manifest.codec_config.sample_rate
        self.frame_rate = self.sample_rate / self.manifest.codec_config.hop_length
        graphs = self.manifest.variants[compute_dtype]
        stage = graphs["depformer_stage"]
        if stage.bound is None:
            raise ValueError(
                f"{self.folder} was exported by an older dia-ort (its depformer stage has no kernels file); "
                "re-export it with `python -m export`"
            )
        on_cpu = self.device.kind == "cpu"
        paths = [graph_file(graphs["backbone_step"], on_cpu), graph_file(stage, on_cpu)]
        paths += [self.manifest.codec[name].file.path for name in ("mimi_decoder", "mimi_encoder")]
        sessions = open_sessions([self.folder / p for p in paths], self.device)
        backbone, depformer, self.mimi, self.mimi_encoder = sessions
        # by the prefix object's id (`_plan`)
        self.plans: Recent[int, tuple[PrefixConfig, PrefixPlan]] = Recent(PLANNED_PREFIXES)
        self.graphs = DecoderGraphs(
            backbone,
            depformer,
            StageWeights(
                self.folder / stage.bound.path,
                config.depth,
                {i.name: i.type for i in depformer.get_inputs()},
            ),
        )

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: object | None = None,
        threads: int | None = None,
        compute_dtype: str = "float32",
    ) -> Dia2:
        """An exported folder, or a Hub repo holding one (downloaded with huggingface_hub); a checkpoint
        is exported on first use with `compute_dtype`'s variant."""
        folder = resolve_model_folder(model_id, revision, cache_dir, compute_dtype)
        return cls(folder, device, threads, compute_dtype)

    def generate(
        self,
        script: str | Iterable[str],
        config: GenerationConfig | None = None,
        *,
        seed: int | None = None,
        draw: Draw | None = None,
        prefix: PrefixConfig | None = None,
        **overrides: float | int,
    ) -> GenerationResult:
        """Speak `script`: text with [S1]/[S2] tags and `<break time="1.5s"/>` pauses, a list of lines (the
        reference joins them), or an iterator of pieces as a language model writes them. `overrides`
        are the reference's: temp_text, topk_text, temp_audio, topk_audio, cfg_scale, cfg_filter_k,
        initial_padding. `draw` picks an id from a sampler's probabilities (default: inverse CDF on a
        generator seeded by `seed`). `prefix`: speakers' clips to continue from (voice cloning). The
        waveform is `stream`'s chunks, joined."""
        stream = self.stream(script, config, seed=seed, draw=draw, prefix=prefix, **overrides)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        script: str | Iterable[str],
        config: GenerationConfig | None = None,
        *,
        seed: int | None = None,
        draw: Draw | None = None,
        prefix: PrefixConfig | None = None,
        chunk_frames: int = CHUNK_FRAMES,
        **overrides: float | int,
    ) -> AudioStream:
        """`generate`'s audio as it is made: one frame (80 ms) as soon as it is final, then chunks of
        `chunk_frames` frames, from the first word on; the result (codes, timestamps) once it ends."""
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a whole number >= 1, got {chunk_frames!r}")
        config = _merged(config or GenerationConfig(), overrides)
        pieces = _pieces(script)
        reader = ScriptReader(self.tokenizer.encode, self.tokenizer.ids, self.frame_rate)
        sampling = (config.text, config.audio, config.cfg_scale, config.cfg_filter_k, config.initial_padding)
        draw = draw or random_draw(np.random.default_rng(seed))
        if prefix is None and min(self.config.delay_pattern) < 1:
            raise ValueError(
                f"delay pattern {list(self.config.delay_pattern)}: a codebook without delay has no audio to read at "
                "the first frame (nari-labs/dia2 fails there too); give this model a prefix"
            )
        plan = self._plan(prefix) if prefix is not None else None
        loop = FrameLoop(self.config, self.tokenizer.ids, reader, pieces, sampling, draw, plan)
        return AudioStream(
            self, SpeechAudio(self, loop, chunk_frames, prefix is not None and prefix.include_audio)
        )

    def encode(self, waveform: np.ndarray) -> np.ndarray:
        """A clip at the model's rate `[N]` -> its codes `[K, ceil(N / hop)]` (Mimi's encoder)."""
        return self.mimi_encoder.run(["codes"], {"waveform": np.asarray(waveform, np.float32)[None]})[0][0]

    def _plan(self, prefix: PrefixConfig) -> PrefixPlan:
        """The prefix's plan, kept for the PLANNED_PREFIXES prefix objects used last: a server's voice is
        one object that every request of it passes (a plan is only read, never changed)."""
        if not isinstance(prefix, PrefixConfig):
            raise TypeError(f"prefix must be a PrefixConfig, got {type(prefix).__name__}")
        kept = self.plans.get(id(prefix))
        if kept is not None and kept[0] is prefix:
            return kept[1]
        rate = self.sample_rate

        def load(audio: object) -> np.ndarray:
            return load_audio(audio if not isinstance(audio, np.ndarray) else (audio, rate), to_rate=rate)

        tokenizer = self.tokenizer
        plan = build_plan(
            prefix, tokenizer.ids, tokenizer.encode, tokenizer.tags, load, self.encode, self.frame_rate, rate
        )
        self.plans.put(id(prefix), (prefix, plan))
        return plan

    def decoder(self) -> MimiDecoder:
        """A fresh streaming decoder on this model's Mimi."""
        return MimiDecoder(self.mimi)


class MimiDecoder:
    """Mimi's streaming decoder: codes in chunks -> their audio; the state is carried between chunks."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.frames = session, 0
        self.state = {v.name: np.zeros([1, *v.shape[1:]], np.float32) for v in session.get_inputs()[2:]}

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes `[K, F]` that follow the ones decoded so far -> `[F x hop]` samples, clamped to [-1, 1]
        as the reference clamps them."""
        feeds = {"codes": codes[None].astype(np.int64), "offset": np.array([2 * self.frames])} | self.state
        waveform, *state = self.session.run(None, feeds)
        self.state = dict(zip(self.state, state, strict=True))
        self.frames += codes.shape[-1]
        return np.clip(waveform[0], -1.0, 1.0)


class SpeechAudio:
    """One generation's audio: after each frame, the chunks that became final, decoded by Mimi's
    streaming decoder (one frame first, then `chunk_frames` at a time); `result()` once it has ended."""

    def __init__(self, model: Dia2, loop: FrameLoop, chunk_frames: int, include_prefix: bool) -> None:
        self.model, self.loop, self.chunk = model, loop, chunk_frames
        self.decoder: MimiDecoder | None = None
        self.crop = self.sent = 0  # the first frame spoken, and the frames decoded
        self.include_prefix = include_prefix
        self.ended = False
        self.chunks: list[np.ndarray] = []
        if include_prefix:
            self._start(0)
        elif loop.config.second_stream_ahead:
            # The reference crops at the first frame whose main text token is the new-word id, which the
            # second stream moves off the main one: only a word whose first token is that id could
            # bring it back. So the audio starts where the generation does (after a prefix's frames),
            # and is spoken as soon as it is final.
            self._start(loop.start)

    def after_frame(self, stepped: bool) -> list[np.ndarray]:
        """The chunks that the frame just run completed (`stepped`), or all the rest once the
        generation has ended (not `stepped`)."""
        if not stepped:
            self._end()
        elif self.decoder is None and self.loop.first_word is not None:
            self._start(max(self.loop.first_word, 0))
        chunks = []
        while self.decoder is not None and (frames := self._ready()):
            chunks.append(self._decode(frames))
        return chunks

    def _ready(self) -> int:
        """Frames of the next chunk if it can be decoded now, else 0."""
        size, left = self._next_size(), self.loop.final_frames - self.sent
        if left >= size:
            return size
        return left if self.ended and left > 0 else 0

    def _next_size(self) -> int:
        """The first chunk is one frame, so the audio starts as soon as a frame is final; then `chunk`."""
        return self.chunk if self.sent > self.crop else 1

    def _start(self, crop: int) -> None:
        self.decoder, self.crop, self.sent = self.model.decoder(), crop, crop

    def _end(self) -> None:
        """The reference's crop: at the first word, else where the generation started; at frame 0 where
        no frame comes after it."""
        self.ended = True
        if self.decoder is None:
            self._start(self.loop.start)
        if self.crop >= self.loop.final_frames:
            self._start(0)

    def _decode(self, frames: int) -> np.ndarray:
        assert self.decoder is not None
        codes = self.loop.aligned(self.sent, self.sent + frames)
        self.sent += frames
        self.chunks.append(self.decoder.decode(codes))
        return self.chunks[-1]

    def result(self) -> GenerationResult:
        """The generation whole: its codes, timestamps and the chunks joined."""
        rate, transcript = self.model.frame_rate, self.loop.state.transcript
        if self.loop.prefix_words and not self.include_prefix:  # the prefix's words are not the output's
            transcript = transcript[self.loop.prefix_words :]
        stamps = [(word, (step - self.crop) / rate) for word, step in transcript if step >= self.crop]
        waveform = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        codes = self.loop.aligned(self.crop, self.loop.final_frames)
        return GenerationResult(codes, waveform, self.model.sample_rate, stamps)


class AudioStream(Iterator[np.ndarray]):
    """The chunks of one generation, run as a batch of one from the first `next`; `result` holds it
    whole (codes, timestamps, the chunks joined) once the stream is exhausted. Until then it holds no
    rows, so its `audio` (and loop) may join another batch instead: the server's scheduler does."""

    def __init__(self, model: Dia2, audio: SpeechAudio) -> None:
        self.model, self.audio, self.loop = model, audio, audio.loop
        self.batch: FrameBatch | None = None
        self.pending: deque[np.ndarray] = deque()
        self.result: GenerationResult | None = None
        self.failure: Exception | None = None  # what ended it, raised again by every later `next`

    def __next__(self) -> np.ndarray:
        if self.failure is not None:
            raise self.failure
        if self.batch is None:
            batch = FrameBatch(self.model.config, self.model.graphs)
            batch.join(self.loop)  # a prefix that fails to feed leaves no batch behind
            self.batch = batch
        while not self.pending:
            if self.audio.ended:
                if self.result is None:
                    self.result = self.audio.result()
                raise StopIteration
            stepped = not self.batch.step()  # a batch of one returns its generation once it has ended
            if self.loop in self.batch.failed:
                self.failure = self.batch.failed[self.loop]
                raise self.failure
            self.pending.extend(self.audio.after_frame(stepped))
        return self.pending.popleft()


def _pieces(script: str | Iterable[str]) -> Iterator[str]:
    """The script as pieces of text: a string, or lines joined by newlines (the reference's
    `normalize_script`, whose stripping changes no word), or any other iterable's strings."""
    if isinstance(script, str):
        if not script.strip():
            raise ValueError("script is empty: give the text to speak, e.g. '[S1] Hello there.'")
        return iter([script])
    if isinstance(script, Sequence):
        if not all(isinstance(line, str) for line in script):
            raise TypeError("script lines must be strings")
        return _pieces("\n".join(line.strip() for line in script))
    if isinstance(script, Iterable):
        return iter(script)
    raise TypeError(
        f"script must be a string, a list of lines or an iterable of strings, got {type(script).__name__}"
    )


OVERRIDES = {
    "temp_text": ("text", "temperature"),
    "topk_text": ("text", "top_k"),
    "temp_audio": ("audio", "temperature"),
    "topk_audio": ("audio", "top_k"),
}


def _merged(config: GenerationConfig, overrides: dict[str, float | int]) -> GenerationConfig:
    """The reference's keyword overrides on `config` (None leaves a value as it is)."""
    given = {name: value for name, value in overrides.items() if value is not None}
    known = set(OVERRIDES) | {"cfg_scale", "cfg_filter_k", "initial_padding"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"generate() got unknown options {unknown}; it takes {sorted(known)}")
    for name, (stream, key) in OVERRIDES.items():
        if name in given:
            config = replace(config, **{stream: replace(getattr(config, stream), **{key: given.pop(name)})})
    return replace(config, **given)
