"""`Dia2`: Dia2 speech from an exported folder, torch-free, with the reference's API shape.

`generate(script, config=GenerationConfig(...))` runs nari-labs/dia2's generation loop
(`runtime/generator.py` at 8687268; docs/dia2.md section 5) on the exported graphs: per frame the
backbone step for the conditional and unconditional rows, the text action through the state machine,
codebook 0, then each depformer stage; the codes are undelayed, cropped at the first word and decoded
by Mimi's streaming decoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.dia2.sampling import Draw, SamplingConfig, guide, mask_ids, random_draw, sample
from dia_ort.dia2.script import parse_script
from dia_ort.dia2.state_machine import StateMachine, TokenIds
from dia_ort.dia2_config import Dia2Config
from dia_ort.engine import Device, open_sessions
from dia_ort.hub import resolve_model_folder
from dia_ort.manifest import Manifest, cache_names

UNGENERATED = -2
MAX_PADDING = 6  # the reference's state machine: pads a word may wait before a new word is forced


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
        self, folder: str | os.PathLike, device: object | None = None, threads: int | None = None
    ) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        if self.manifest.family != "dia2":
            raise ValueError(f"{self.folder} holds a {self.manifest.family} model; open it with dia_ort.Dia")
        self.manifest.check_files(self.folder, "float32")
        config = self.manifest.model
        assert isinstance(config, Dia2Config)
        if min(config.delay_pattern) < 1:
            raise ValueError(
                f"delay pattern {list(config.delay_pattern)}: a codebook without delay has no audio to read at "
                "the first frame (nari-labs/dia2 fails there too); this model needs an audio prefix, which "
                "dia_ort.Dia2 does not take yet"
            )
        self.config = config
        self.device = Device.parse(device, threads)
        self.tokenizer = Tokenizer(self.folder, config)
        self.sample_rate = self.manifest.codec_config.sample_rate
        self.frame_rate = self.sample_rate / self.manifest.codec_config.hop_length
        graphs = self.manifest.variants["float32"]
        paths = [graphs["backbone_step"].file.path, graphs["depformer_stage"].file.path]
        paths += [self.manifest.codec["mimi_decoder"].file.path]
        self.backbone, self.depformer, self.mimi = open_sessions(
            [self.folder / p for p in paths], self.device
        )

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: object | None = None,
        threads: int | None = None,
    ) -> Dia2:
        """An exported folder, or a Hub repo holding one (downloaded with huggingface_hub)."""
        return cls(resolve_model_folder(model_id, revision, cache_dir, "float32"), device, threads)

    def generate(
        self,
        script: str | Sequence[str],
        config: GenerationConfig | None = None,
        *,
        seed: int | None = None,
        draw: Draw | None = None,
        **overrides: float | int,
    ) -> GenerationResult:
        """Speak `script` ([S1]/[S2] tags, `<break time="1.5s"/>` pauses). `overrides` are the reference's:
        temp_text, topk_text, temp_audio, topk_audio, cfg_scale, cfg_filter_k, initial_padding. `draw`
        picks an id from a sampler's probabilities (default: inverse CDF on a generator seeded by `seed`)."""
        config = _merged(config or GenerationConfig(), overrides)
        text = _normalized(script)
        entries = parse_script(text, self.tokenizer.encode, self.tokenizer.ids, self.frame_rate)
        draw = draw or random_draw(np.random.default_rng(seed))
        tokens, first_word, transcript = self._frames(entries, config, draw)
        crop = max(first_word, 0)
        if crop >= tokens.shape[-1]:
            crop = 0
        tokens = tokens[:, crop:]
        waveform = np.clip(self.decode(tokens), -1.0, 1.0)
        stamps = [(word, (step - crop) / self.frame_rate) for word, step in transcript if step - crop >= 0]
        return GenerationResult(tokens, waveform, self.sample_rate, stamps)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes `[K, T]` -> the waveform `[T x hop]` (one call of the streaming decoder from its start)."""
        if codes.shape[-1] == 0:
            return np.zeros(0, np.float32)
        feeds = {"codes": codes[None].astype(np.int64), "offset": np.zeros(1, np.int64)}
        for value in self.mimi.get_inputs()[2:]:
            feeds[value.name] = np.zeros([1, *value.shape[1:]], np.float32)
        return self.mimi.run(["waveform"], feeds)[0][0]

    def _frames(
        self, entries: list, config: GenerationConfig, draw: Draw
    ) -> tuple[np.ndarray, int, list[tuple[str, int]]]:
        """The reference's loop: -> the codes undelayed `[K, T]`, the first word's frame less the initial
        padding, and each word's start frame."""
        c, ids = self.config, self.tokenizer.ids
        machine = StateMachine(ids, c.second_stream_ahead, MAX_PADDING, config.initial_padding)
        state = machine.new_state(entries)
        limit, codebooks = c.max_context_steps, c.codebooks
        audio = np.full((codebooks, limit + 1), UNGENERATED, np.int64)
        delays = np.array(c.delay_pattern)
        frame = np.full((2, c.channels), ids.pad, np.int64)
        frame[0, 0], frame[1, 0] = ids.bos, ids.zero
        backbone = _Caches(self.backbone, c.decoder.layers, (2, c.decoder.kv_heads, 0, c.decoder.head_dim))
        stages = _Caches(
            self.depformer, c.depformer.layers, (2, c.depformer.heads, max(c.depth, 1), c.depformer.head_dim)
        )
        first_word, end, last = None, None, -1
        for t in range(limit):
            if end is not None and t >= end:
                break
            frame[:, 2:] = np.where(delays > t, c.audio_bos_id, audio[:, t])
            frame[1, :2] = ids.zero, ids.pad
            backbone.grow(t + 1, limit)
            hidden, action_logits, cb0_logits = backbone.run(
                {"tokens": frame[:, None], "positions": np.full((2, 1), t, np.int64)},
                ("hidden", "action_logits", "cb0_logits"),
            )
            action = sample(guide(action_logits, config.cfg_scale, config.cfg_filter_k), config.text, draw)
            main, second = machine.process(t, state, action)
            second = ids.pad if second == -1 else second
            if first_word is None and main == ids.new_word:
                first_word = t - config.initial_padding
            frame[:, 0], frame[:, 1] = main, second
            cb0 = mask_ids(
                guide(cb0_logits, config.cfg_scale, config.cfg_filter_k), (c.audio_pad_id, c.audio_bos_id)
            )
            audio[0, t + 1] = code = sample(cb0, config.audio, draw)
            text = {"text": np.array([[main, second]] * 2)} if c.depformer_text_embedding else {}
            for s in range(c.depth):
                feeds = {"stage": np.array([s]), "previous": np.array([code, code]), "hidden": hidden} | text
                (logits,) = stages.run(feeds, ("logits",))
                audio[s + 1, t + 1] = code = sample(
                    guide(logits, config.cfg_scale, config.cfg_filter_k), config.audio, draw
                )
            last = t
            if end is None and state.end_step is not None:
                end = state.end_step + int(delays.max()) + MAX_PADDING
        audio = audio[:, : min(last + 2, audio.shape[-1])]
        audio[audio == UNGENERATED] = c.audio_pad_id
        frames = max(0, audio.shape[-1] - int(delays.max()))
        undelayed = np.stack([audio[k, d : d + frames] for k, d in enumerate(delays)])
        return undelayed, 0 if first_word is None else first_word, state.transcript


class _Caches:
    """One graph's self-attention caches, bound as its `past_*` inputs and `present_*` outputs (updated
    in place); the backbone's grow by `CACHE_GROWTH` frames as the generation needs them."""

    GROWTH = 256

    def __init__(self, session: ort.InferenceSession, layers: int, shape: tuple[int, ...]) -> None:
        self.session, self.layers = session, layers
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * layers)]

    def grow(self, needed: int, limit: int) -> None:
        slots = self.buffers[0].shape[2]
        if needed <= slots:
            return
        wanted = min(limit, -(-needed // self.GROWTH) * self.GROWTH)
        grown = []
        for buffer in self.buffers:
            bigger = np.zeros((*buffer.shape[:2], wanted, buffer.shape[3]), np.float32)
            bigger[:, :, :slots] = buffer
            grown.append(bigger)
        self.buffers = grown

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:  # first: the outputs come back in the order they are bound
            binding.bind_output(name)
        names = zip(
            cache_names("past", self.layers), cache_names("present", self.layers), self.buffers, strict=True
        )
        for past, present, buffer in names:
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[: len(outputs)]


def _normalized(script: str | Sequence[str]) -> str:
    """The reference's `normalize_script`: a string stripped, or lines stripped and joined by newlines."""
    if isinstance(script, str):
        text = script.strip()
    elif isinstance(script, Sequence) and all(isinstance(line, str) for line in script):
        text = "\n".join(line.strip() for line in script)
    else:
        raise TypeError(f"script must be a string or a sequence of strings, got {type(script).__name__}")
    if not text:
        raise ValueError("script is empty: give the text to speak, e.g. '[S1] Hello there.'")
    return text


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
