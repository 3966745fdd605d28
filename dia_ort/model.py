"""The `Dia` API of the original package, on ONNX Runtime and without torch."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dia_ort.audio import DAC_SAMPLE_RATE, load_audio, resample, save_audio
from dia_ort.codec import Codec
from dia_ort.engine import Device, Engine
from dia_ort.generation import Generation, Step
from dia_ort.hub import resolve_model_folder
from dia_ort.item import ItemState
from dia_ort.longform import LongFormStream
from dia_ort.manifest import FLOAT_DTYPES, QUANTIZED_DTYPES, Manifest
from dia_ort.options import DEFAULTS, GenerationOptions
from dia_ort.progress import report_speed
from dia_ort.recent import Recent
from dia_ort.script import LONG_FORM_SECONDS
from dia_ort.streaming import (
    CHUNK_FRAMES,
    FIRST_CHUNK_FRAMES,
    AudioChunk,
    check_chunk_frames,
)
from dia_ort.text import encode_text

log = logging.getLogger(__name__)

# The seed API's constants, for callers that use them; the runtime reads the codec's rate and hop from
# the manifest.
DEFAULT_SAMPLE_RATE = DEFAULTS.sample_rate
SAMPLE_RATE_RATIO = 512


AudioPrompt = (
    Any  # a path, a waveform (array, array-like with .numpy(), or (array, rate)), or int codes [T, C]
)


COMPUTE_DTYPES = (*FLOAT_DTYPES, *QUANTIZED_DTYPES)
# Clips whose codes a model keeps, the last encoded: a script that speaks line after line in one voice
# passes the same clip each time, and the DAC encoder takes about 4 s for 10 s of audio on 2 cores.
ENCODED_CLIPS = 16


def _device_dtype(requested: str, device: Device) -> str:
    """The precision to run on `device`: the requested one, but float32 for half precision on a CPU."""
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {requested!r}")
    return "float32" if device.kind == "cpu" and requested in ("float16", "bfloat16") else requested


def _choose_dtype(manifest: Manifest, requested: str, device: Device) -> str:
    """The variant to run: the requested one when exported and sensible on the device, else float32."""
    wanted = _device_dtype(requested, device)
    available = sorted(manifest.variants)
    fallback = "float32" if "float32" in available else available[0]
    if wanted != requested:
        log.warning("compute_dtype=%r runs poorly on the CPU; using %r instead", requested, fallback)
        return fallback
    if requested in manifest.variants:
        return requested
    if requested in QUANTIZED_DTYPES:
        raise ValueError(
            f"this model folder has no {requested} variant (it has {available}); "
            f"export it with `python -m export --quantize {requested} ...`"
        )
    log.warning(
        "compute_dtype=%r was not exported for this model (it has %s); using %r. "
        "Export it with `python -m export --dtype %s ...`",
        requested,
        available,
        fallback,
        requested,
    )
    return fallback


class Dia:
    """Text-to-dialogue generation: text with [S1]/[S2] tags -> 44.1 kHz speech."""

    def __init__(
        self,
        folder: str | os.PathLike,
        compute_dtype: str = "float32",
        device: object | None = None,
        threads: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        if self.manifest.family != "dia":
            raise ValueError(
                f"{self.folder} holds a {self.manifest.family} model, which dia_ort.Dia cannot run: open it "
                "with dia_ort.Dia2 or `dia-ort speak` (`dia-ort serve` runs Dia 1.6B folders only, so far)"
            )
        self.device = Device.parse(device, threads)
        self.compute_dtype = _choose_dtype(self.manifest, compute_dtype, self.device)
        self.manifest.check_files(self.folder, self.compute_dtype)
        self.config = self.manifest.model
        with ThreadPoolExecutor(1) as pool:  # the codec's sessions build beside the model's
            codec = pool.submit(Codec, self.folder, self.manifest, self.device)
            self.engine = Engine(self.folder, self.manifest, self.compute_dtype, self.device)
            self.codec = codec.result()
        self.encoded_clips: Recent[bytes, np.ndarray] = Recent(ENCODED_CLIPS)  # by the clip's digest

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        compute_dtype: str = "float16",
        device: object | None = None,
        **kwargs: Any,
    ) -> Dia:
        """Load an exported folder, a Hub repo holding one, or a torch checkpoint (exported on first use).

        A torch checkpoint is exported with the variant that `compute_dtype` runs on `device` (float32
        on a CPU for half precision), and again with it added when a later call asks for another.
        Keywords: `revision` and `cache_dir` for Hub downloads, `threads` for ONNX Runtime's CPU threads.
        """
        unknown = set(kwargs) - {"revision", "cache_dir", "threads"}
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keywords {sorted(unknown)}")
        threads = kwargs.pop("threads", None)
        variant = _device_dtype(compute_dtype, Device.parse(device, threads))
        folder = resolve_model_folder(model_id, variant=variant, **kwargs)
        return cls(folder, compute_dtype=compute_dtype, device=device, threads=threads)

    # -- generation ---------------------------------------------------------------------------------

    def start(
        self,
        texts: str | Sequence[str],
        audio_prompts: Sequence[AudioPrompt | None] | None = None,
        options: GenerationOptions | None = None,
    ) -> Generation:
        """Validate a request and return its step iterator (the streaming core of every entry point)."""
        options = (options or GenerationOptions()).validate()
        # the original's torch.compile speeds up the step loop on CUDA; here a captured CUDA graph does
        cuda_graph = options.use_torch_compile and self.device.kind == "cuda"
        if options.use_torch_compile and not cuda_graph:
            log.info("use_torch_compile: CUDA graph capture needs device='cuda'; running the plain step loop")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts is empty")
        if audio_prompts is None:
            audio_prompts = [None] * len(texts)
        elif isinstance(audio_prompts, (str, os.PathLike, np.ndarray)) or len(audio_prompts) != len(texts):
            count = (
                "one prompt" if not isinstance(audio_prompts, Sequence) else f"{len(audio_prompts)} prompts"
            )
            raise ValueError(
                f"audio_prompts must be a list with one entry per text: {len(texts)} texts, {count}"
            )
        ids = [encode_text(t, self.config.text_length) for t in texts]
        prompts = [None if p is None else self.prompt_codes(p) for p in audio_prompts]
        return Generation(self.engine, ids, prompts, options, cuda_graph=cuda_graph)

    def generate_codes(
        self,
        texts: str | Sequence[str],
        audio_prompts: Sequence[AudioPrompt | None] | None = None,
        callback: Callable[[int, int], None] | None = None,
        **options: Any,
    ) -> list[np.ndarray]:
        """Audio codes `[T, C]` per text (delay undone, prompt excluded)."""
        opts = GenerationOptions(**options)
        generation = self.start(texts, audio_prompts, opts)
        began = time.perf_counter()
        step = None
        for step in generation:
            if callback is not None:
                callback(step.index, step.total)
        if opts.verbose and step is not None:
            report_speed(step.index, time.perf_counter() - began, self.engine.frame_rate)
        return generation.codes()

    def generate_batch(
        self,
        texts: Sequence[str],
        audio_prompts: Sequence[AudioPrompt | None] | None = None,
        top_p: float = DEFAULTS.top_p,
        temperature: float = DEFAULTS.temperature,
        top_k: int | None = DEFAULTS.top_k,
        sample_rate: int = DEFAULTS.sample_rate,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        use_torch_compile: bool = DEFAULTS.use_torch_compile,
        cfg_scale: float = DEFAULTS.cfg_scale,
        verbose: bool = DEFAULTS.verbose,
        callback: Callable[[int, int], None] | None = None,
        *,
        cfg_filter_top_k: int | None = DEFAULTS.cfg_filter_top_k,
        seed: int | None = DEFAULTS.seed,
    ) -> list[np.ndarray]:
        """Audio (float32 mono at `sample_rate`) for each text, generated as one batch."""
        if isinstance(texts, str):
            raise TypeError("generate_batch takes a list of texts; use generate() for one text")
        options = GenerationOptions(
            top_p=top_p, temperature=temperature, top_k=top_k, sample_rate=sample_rate,
            max_new_tokens=max_new_tokens, use_torch_compile=use_torch_compile, cfg_scale=cfg_scale,
            verbose=verbose, cfg_filter_top_k=cfg_filter_top_k, seed=seed,
        )  # fmt: skip
        codes = self.generate_codes(texts, audio_prompts, callback=callback, **vars(options))
        return [self.codes_to_audio(c, sample_rate) for c in codes]

    def generate(
        self,
        text: str,
        audio_prompt: AudioPrompt | None = None,
        top_p: float = DEFAULTS.top_p,
        temperature: float = DEFAULTS.temperature,
        top_k: int | None = DEFAULTS.top_k,
        sample_rate: int = DEFAULTS.sample_rate,
        max_new_tokens: int = DEFAULTS.max_new_tokens,
        use_torch_compile: bool = DEFAULTS.use_torch_compile,
        cfg_scale: float = DEFAULTS.cfg_scale,
        verbose: bool = DEFAULTS.verbose,
        callback: Callable[[int, int], None] | None = None,
        *,
        cfg_filter_top_k: int | None = DEFAULTS.cfg_filter_top_k,
        seed: int | None = DEFAULTS.seed,
        long_form: bool = False,
        long_form_seconds: float = LONG_FORM_SECONDS,
    ) -> np.ndarray:
        """Audio (float32 mono at `sample_rate`) for one text with [S1]/[S2] speaker tags.

        With `long_form`, a script of any length is generated in parts of about `long_form_seconds`
        of speech, each prompted with the one before it, and joined with short crossfades.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; use generate_batch for a list")
        options = GenerationOptions(
            top_p=top_p, temperature=temperature, top_k=top_k, sample_rate=sample_rate,
            max_new_tokens=max_new_tokens, use_torch_compile=use_torch_compile, cfg_scale=cfg_scale,
            verbose=verbose, cfg_filter_top_k=cfg_filter_top_k, seed=seed,
        )  # fmt: skip
        if long_form:
            stream = self.generate_stream(
                text,
                audio_prompt,
                callback,
                long_form=True,
                long_form_seconds=long_form_seconds,
                **vars(options),
            )
            return np.concatenate([np.zeros(0, dtype=np.float32), *stream])
        prompts = None if audio_prompt is None else [audio_prompt]
        (audio,) = self.generate_batch([text], prompts, callback=callback, **vars(options))
        return audio

    def generate_stream(
        self,
        text: str,
        audio_prompt: AudioPrompt | None = None,
        callback: Callable[[int, int], None] | None = None,
        *,
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
        long_form: bool = False,
        long_form_seconds: float = LONG_FORM_SECONDS,
        **options: Any,
    ) -> Iterator[np.ndarray]:
        """`generate`, yielding float32 chunks at `sample_rate` while the audio is generated.

        Takes every keyword of `generate` (`options`: temperature, top_p, seed, sample_rate, ...). The
        first chunk holds about `first_chunk_frames` frames (86 a second) and comes once the codec's
        decode block that holds them is final (its frames less the decoder's 9.3-frame lookahead); later
        chunks at least `chunk_frames`. Sizes round up to the codec's decode blocks (18, 18, 36, 72, ...
        frames; 64 each on CUDA), which is what makes the joined chunks equal `generate(...)` with the
        same options bit for bit. The request is checked here, before the first chunk is asked for.
        """
        if not isinstance(text, str):
            raise TypeError(
                f"text must be a str, got {type(text).__name__}; use generate_batch_stream for a list"
            )
        check_chunk_frames(first_chunk_frames, chunk_frames)
        opts = GenerationOptions(**options).validate()
        if long_form:
            prompt = None if audio_prompt is None else self.prompt_codes(audio_prompt)
            run_part = partial(self._run_part, (first_chunk_frames, chunk_frames))
            parts = LongFormStream(
                run_part, self.config, self.engine.frame_rate, text, prompt, opts, long_form_seconds, callback
            )
            return iter(parts)
        prompts = None if audio_prompt is None else [audio_prompt]
        pairs = self.generate_batch_stream(
            [text],
            prompts,
            callback,
            first_chunk_frames=first_chunk_frames,
            chunk_frames=chunk_frames,
            **options,
        )
        return (audio for _, audio in pairs)

    def generate_batch_stream(
        self,
        texts: Sequence[str],
        audio_prompts: Sequence[AudioPrompt | None] | None = None,
        callback: Callable[[int, int], None] | None = None,
        *,
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
        **options: Any,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """`generate_batch`, yielding `(item, chunk)` as each item's audio is generated.

        Items end at different steps; each item's chunks, joined, equal its `generate_batch` result.
        """
        if isinstance(texts, str):
            raise TypeError("generate_batch_stream takes a list of texts; use generate_stream for one text")
        check_chunk_frames(first_chunk_frames, chunk_frames)
        opts = GenerationOptions(**options)
        generation = self.start(texts, audio_prompts, opts)
        events = generation.stream(self.codec, opts.sample_rate, first_chunk_frames, chunk_frames)
        return _pairs(events, callback, opts.verbose, self.engine.frame_rate)

    def _run_part(
        self, chunking: tuple[int, int], text: str, prompt: np.ndarray | None, options: GenerationOptions
    ) -> tuple[ItemState, Iterator[Step | AudioChunk]]:
        """One long-form part, as a fixed batch of one: its item and its steps and audio chunks."""
        generation = self.start([text], [prompt], options)
        return generation.items[0], generation.stream(self.codec, options.sample_rate, *chunking)

    # -- codec --------------------------------------------------------------------------------------

    def encode_audio(self, audio: Any, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
        """A path or waveform (mono or multi-channel, any rate) -> DAC codes `[T, C]`.

        The encoder is deterministic, so the codes of the ENCODED_CLIPS clips encoded last are kept, by
        their samples at 44.1 kHz: a clip seen again (a path read again, too) skips the encoder.
        """
        wave = load_audio(audio, sample_rate)
        frames = -(-len(wave) // self.codec.config.hop_length)
        room = self.config.audio_room
        if frames > room:
            raise ValueError(
                f"audio is {len(wave) / DAC_SAMPLE_RATE:.1f} s ({frames} frames); the model's audio window "
                f"takes at most {room} frames ({room / self.engine.frame_rate:.1f} s)"
            )
        key = hashlib.blake2b(wave.tobytes(), digest_size=16).digest()
        codes = self.encoded_clips.get(key)
        if codes is None:
            codes = self.codec.encode(wave)
            self.encoded_clips.put(key, codes)
        return codes.copy()  # the kept array never leaves, so a caller's edits cannot reach the next call

    def decode_codes(self, codes: Any) -> np.ndarray:
        """DAC codes `[T, C]` -> float32 waveform at 44.1 kHz."""
        return self.codec.decode(codes)

    def codes_to_audio(self, codes: np.ndarray, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
        """Generated codes -> float32 audio at `sample_rate`; an item that ended at once is empty."""
        if len(codes) == 0:
            return np.zeros(0, dtype=np.float32)
        return resample(self.codec.decode(codes), DAC_SAMPLE_RATE, sample_rate)

    def save_audio(
        self, path: str | os.PathLike, audio: np.ndarray, sample_rate: int = DEFAULT_SAMPLE_RATE
    ) -> None:
        """Write audio to a file; the format comes from the extension (.wav, .flac, .ogg, .mp3, ...)."""
        save_audio(path, audio, sample_rate)

    # -- helpers ------------------------------------------------------------------------------------

    def prompt_codes(self, prompt: AudioPrompt) -> np.ndarray:
        """Codes `[P, C]` for an audio prompt given as codes, a path or a waveform."""
        value = prompt.detach().cpu().numpy() if hasattr(prompt, "detach") else prompt
        is_codes = (
            isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer) and value.ndim == 2
        )
        if is_codes and value.shape[1] == self.config.num_channels:
            return self.codec.check_codes(value)
        return self.encode_audio(value)


def _pairs(
    events: Iterator[Step | AudioChunk],
    callback: Callable[[int, int], None] | None,
    verbose: bool,
    frame_rate: float,
) -> Iterator[tuple[int, np.ndarray]]:
    """`(item, audio)` for the nonempty chunks of a stream; steps go to the callback and `verbose`."""
    began = time.perf_counter()
    steps = 0
    for event in events:
        if isinstance(event, AudioChunk):
            if len(event.audio):
                yield event.item, event.audio
        else:
            steps = event.index
            if callback is not None:
                callback(event.index, event.total)
    if verbose:
        report_speed(steps, time.perf_counter() - began, frame_rate)
