"""The command line: `dia-ort speak` (text -> an audio file, or audio on stdout as it is made) and
`dia-ort serve` (the speech server)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from tqdm import tqdm

from dia_ort.audio import StreamResampler, check_output_path, pcm16, save_audio, streaming_wav_header
from dia_ort.hub import model_family
from dia_ort.manifest import FLOAT_DTYPES, QUANTIZED_DTYPES
from dia_ort.options import OPTIONS, GenerationOptions
from dia_ort.script import LONG_FORM_SECONDS

if TYPE_CHECKING:
    from dia_ort.serving.app import ServerSettings

STDOUT = "-"


PRECISIONS = (*FLOAT_DTYPES, *QUANTIZED_DTYPES)  # --dtype
# GenerationOptions that `speak` takes as flags (--top-p ...), with their defaults and help
SPEAK_OPTIONS = (
    "seed", "temperature", "top_p", "top_k", "cfg_scale", "cfg_filter_top_k", "max_new_tokens", "sample_rate"
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dia-ort", description="Dia text-to-dialogue on ONNX Runtime.")
    commands = parser.add_subparsers(dest="command", required=True)
    speak = commands.add_parser("speak", help="synthesise dialogue text to an audio file")
    speak.add_argument("text", nargs="?", help="text with [S1]/[S2] tags (default: --file or stdin)")
    speak.add_argument("--file", type=Path, help="read the text from this file")
    speak.add_argument(
        "--model", default="nari-labs/Dia-1.6B-0626", help="exported folder, Hub id or checkpoint"
    )
    speak.add_argument(
        "-o",
        "--output",
        default="dia.wav",
        help="audio file (.wav .flac .ogg .mp3), or - for stdout while the audio is generated",
    )
    speak.add_argument(
        "--format",
        choices=("wav", "pcm"),
        default="wav",
        help="with -o -: WAV with a streaming header, or raw 16-bit little-endian mono PCM "
        "(if the model ends the audio at once, a WAV stream holds only its header)",
    )
    speak.add_argument(
        "--long-form",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate a script of any length in parts (default: on for --file, off otherwise)",
    )
    speak.add_argument(
        "--long-form-seconds",
        type=float,
        default=LONG_FORM_SECONDS,
        help="target speech per part of a long-form script",
    )
    speak.add_argument("--voice", help="audio prompt to clone the voice from (wav, flac, ogg, mp3)")
    speak.add_argument(
        "--voice-text",
        help="transcript of --voice; Dia: it is put before the text; Dia2: [S1]'s words in the clip "
        "(without it, Whisper finds them where it is installed)",
    )
    speak.add_argument("--voice-2", help="Dia2: [S2]'s clip, after --voice's (the prefix of both speakers)")
    speak.add_argument("--voice-2-text", help="Dia2: transcript of --voice-2")
    for name in SPEAK_OPTIONS:
        option = OPTIONS[name]
        kind = float if "float" in option.type else int
        flag = "--" + name.replace("_", "-")
        help_text = f"{option.metadata['help']} (default: {option.default}; Dia2: see docs/dia2.md)"
        speak.add_argument(flag, type=kind, default=None, help=help_text)
    speak.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: best available)")
    speak.add_argument("--dtype", default="float32", help=f"one of {', '.join(PRECISIONS)}")
    speak.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = commands.add_parser("serve", help="run the OpenAI-compatible speech server")
    serve.add_argument("--model", required=True, help="exported folder, Hub id or checkpoint")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="float32", help=f"one of {', '.join(PRECISIONS)}")
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: best available)")
    serve.add_argument("--threads", type=int, help="CPU threads (default: cores; with --ray, shared out)")
    serve.add_argument(
        "--voices", type=Path, help="folder of NAME.wav|flac|mp3 voices with NAME.txt transcripts"
    )
    serve.add_argument(
        "--strict-voices", action="store_true", help="refuse to start if a voice cannot be read"
    )
    serve.add_argument(
        "--api-key",
        help="require this bearer key, or one of several separated by commas (default: $DIA_ORT_API_KEY)",
    )
    serve.add_argument(
        "--requests-per-minute",
        type=int,
        help="speech requests each key (or client address, without keys) may start a minute (default: no limit)",
    )
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond the batch")
    serve.add_argument(
        "--ray", action="store_true", help="run as a Ray Serve application on a local Ray (the ray extra)"
    )
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the server")
    return parser


def read_text(args: argparse.Namespace) -> str:
    """The text to speak: the argument, --file, or standard input."""
    if args.text is not None and args.file is not None:
        raise ValueError("give the text either as an argument or with --file, not both")
    if args.file is not None:
        if not args.file.is_file():
            raise FileNotFoundError(f"text file {args.file} not found")
        text = args.file.read_text(encoding="utf-8")
    elif args.text is not None:
        text = args.text
    else:
        text = sys.stdin.read()
    for clip, words in (("voice", "voice_text"), ("voice_2", "voice_2_text")):
        if getattr(args, words) and not getattr(args, clip):
            raise ValueError(f"--{words.replace('_', '-')} needs --{clip.replace('_', '-')}")
    return text.strip()


def with_voice_text(args: argparse.Namespace, text: str) -> str:
    """Dia's text with the transcript of its voice before it (Dia reads the prompt as the text's start)."""
    if args.voice_2:
        raise ValueError("--voice-2 is Dia2's; Dia clones one voice sample (--voice)")
    if args.voice and not args.voice_text:
        raise ValueError("--voice needs --voice-text, the transcript of the voice sample")
    return f"{args.voice_text.strip()} {text}" if args.voice_text else text


def speak(args: argparse.Namespace) -> None:
    from dia_ort.model import Dia

    text = read_text(args)
    to_stdout = args.output == STDOUT
    if not to_stdout:
        check_output_path(args.output)
        if args.format != "wav":
            raise ValueError("--format pcm is for -o - (stdout); a file's format comes from its extension")
    if model_family(args.model) == "dia2":
        return speak_dia2(args, text)
    text = with_voice_text(args, text)
    given = {name: getattr(args, name) for name in SPEAK_OPTIONS if getattr(args, name) is not None}
    options = GenerationOptions(**given).validate()
    long_form = args.file is not None if args.long_form is None else args.long_form
    model = Dia.from_pretrained(args.model, compute_dtype=args.dtype, device=args.device)
    with tqdm(desc="speaking", unit="step", disable=args.quiet) as bar:

        def progress(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        chunks = model.generate_stream(
            text,
            args.voice,
            progress,
            long_form=long_form,
            long_form_seconds=args.long_form_seconds,
            **vars(options),
        )
        if to_stdout:
            seconds = write_stream(sys.stdout.buffer, chunks, options.sample_rate, args.format)
        else:
            audio = np.concatenate([np.zeros(0, dtype=np.float32), *chunks])
            seconds = len(audio) / options.sample_rate
    if not seconds:
        raise ValueError("the model ended the audio at once; nothing to write (try another --seed)")
    if not to_stdout:
        save_audio(args.output, audio, options.sample_rate)
    print(
        f"wrote {'stdout' if to_stdout else args.output} ({seconds:.2f} s)",
        file=sys.stderr if to_stdout else sys.stdout,
    )


DIA2_SPEAK_OPTIONS = ("seed", "cfg_scale", "cfg_filter_top_k", "sample_rate")  # the rest are Dia 1.6B's


def speak_dia2(args: argparse.Namespace, text: str) -> None:
    """`speak` with a Dia2 folder: the reference's sampling defaults; audio at 24 kHz unless --sample-rate."""
    from dia_ort.dia2 import Dia2, GenerationConfig, PrefixConfig, Speaker

    refused = [
        name for name in SPEAK_OPTIONS if getattr(args, name) is not None and name not in DIA2_SPEAK_OPTIONS
    ]
    refused += ["long_form"] * bool(args.long_form)
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        raise ValueError(
            f"{flags}: not options of Dia2 in dia-ort speak; it takes --dtype, --seed, --cfg-scale, "
            "--cfg-filter-top-k, --sample-rate and the voices (Python's Dia2.generate takes the rest)"
        )
    if args.voice_2 and not args.voice:
        raise ValueError("--voice-2 needs --voice: [S1]'s clip comes first in the prefix")
    prefix = None
    if args.voice:
        second = Speaker(args.voice_2, args.voice_2_text) if args.voice_2 else None
        prefix = PrefixConfig(Speaker(args.voice, args.voice_text), second)
    model = Dia2.from_pretrained(args.model, compute_dtype=args.dtype, device=args.device)
    overrides = {"cfg_scale": args.cfg_scale, "cfg_filter_k": args.cfg_filter_top_k}
    config = GenerationConfig(**{k: v for k, v in overrides.items() if v is not None})
    rate = args.sample_rate or model.sample_rate
    chunks = tqdm(
        model.stream(text, config, seed=args.seed, prefix=prefix),
        desc="speaking",
        unit="chunk",
        disable=args.quiet,
    )
    pieces = resampled(chunks, model.sample_rate, rate)
    if args.output == STDOUT:
        seconds = write_stream(sys.stdout.buffer, pieces, rate, args.format)
    else:
        audio = np.concatenate([np.zeros(0, dtype=np.float32), *pieces])
        seconds = len(audio) / rate
    if not seconds:
        raise ValueError("the model ended the audio at once; nothing to write (try another --seed)")
    if args.output != STDOUT:
        save_audio(args.output, audio, rate)
    print(f"wrote {args.output if args.output != STDOUT else 'stdout'} ({seconds:.2f} s)", file=sys.stderr)


def resampled(chunks: Iterable[np.ndarray], from_rate: int, to_rate: int) -> Iterator[np.ndarray]:
    """`chunks` at `to_rate`, as they come, the resampler's tail at the end; as they are at equal rates."""
    if from_rate == to_rate:
        yield from chunks
        return
    resampler = StreamResampler(to_rate, from_rate)
    for chunk in chunks:
        yield resampler.resample_chunk(chunk)
    yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def write_stream(out: BinaryIO, chunks: Iterable[np.ndarray], sample_rate: int, fmt: str) -> float:
    """Write audio chunks to a byte stream as they come (WAV header first for "wav"); return seconds."""
    if fmt == "wav":
        out.write(streaming_wav_header(sample_rate))
        out.flush()
    samples = 0
    for chunk in chunks:
        out.write(pcm16(chunk))
        out.flush()
        samples += len(chunk)
    return samples / sample_rate


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from dia_ort.serving.app import ServerSettings, build_app
    except ImportError as exc:
        raise ValueError(f"the server needs the serve extra: pip install 'dia-ort[serve]' ({exc})") from exc

    logging.getLogger("dia_ort").setLevel(logging.INFO)
    settings = ServerSettings(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        voices=None if args.voices is None else str(args.voices),
        strict_voices=args.strict_voices,
        api_key=args.api_key or os.environ.get("DIA_ORT_API_KEY") or None,
        requests_per_minute=args.requests_per_minute,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
    )
    if args.ray:
        serve_on_ray(settings, args.host, args.port, args.replicas)
    else:
        uvicorn.run(build_app(settings), host=args.host, port=args.port, log_level="info")


def serve_on_ray(settings: ServerSettings, host: str, port: int, replicas: int) -> None:
    """Start a local Ray, run the server as a Ray Serve application with `replicas`, until interrupted."""
    try:
        import ray
        from ray import serve

        from dia_ort.serving.ray import Scaling, application
    except ImportError as exc:
        raise ValueError(f"--ray needs the ray extra: pip install 'dia-ort[ray]' ({exc})") from exc
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {replicas}")
    cpus = os.cpu_count() or 1
    scaling = Scaling(replicas=replicas, num_cpus=min(1.0, cpus / replicas))  # all fit on this machine
    if settings.threads is None:  # the replicas share the cores, rather than each taking them all
        settings = replace(settings, threads=max(1, cpus // replicas))
    ray.init(num_cpus=cpus, include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop Ray's processes too, in `finally`
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(settings, scaling), blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        (serve if args.command == "serve" else speak)(args)
    except BrokenPipeError:  # the reader of `-o -` went away (`| head`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except (ValueError, TypeError, OSError) as exc:  # OSError: missing, unreadable or unwritable files
        print(f"dia-ort: error: {exc}", file=sys.stderr)
        return 2
    return 0
