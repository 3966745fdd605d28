"""`dia-ort speak`: text (argument, --file or stdin) -> an audio file, with a progress bar."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from dia_ort.audio import DAC_SAMPLE_RATE, save_audio
from dia_ort.options import GenerationOptions


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
        "-o", "--output", type=Path, default=Path("dia.wav"), help="audio file (.wav .flac .ogg .mp3)"
    )
    speak.add_argument("--voice", help="audio prompt to clone the voice from (wav, flac, ogg, mp3)")
    speak.add_argument("--voice-text", help="transcript of --voice; it is put before the text")
    speak.add_argument("--seed", type=int, help="make sampling reproducible")
    speak.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    speak.add_argument("--top-p", type=float, default=0.95)
    speak.add_argument("--top-k", type=int, default=None)
    speak.add_argument("--cfg-scale", type=float, default=3.0)
    speak.add_argument("--cfg-filter-top-k", type=int, default=None)
    speak.add_argument(
        "--max-new-tokens", type=int, default=2048, help="at most this many frames (86 per second)"
    )
    speak.add_argument("--sample-rate", type=int, default=DAC_SAMPLE_RATE)
    speak.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: best available)")
    speak.add_argument("--dtype", default="float32", help="float32, float16, bfloat16, int8 or int4")
    speak.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def read_text(args: argparse.Namespace) -> str:
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
    if args.voice_text:
        if not args.voice:
            raise ValueError("--voice-text needs --voice")
        text = f"{args.voice_text.strip()} {text.strip()}"
    elif args.voice:
        raise ValueError("--voice needs --voice-text, the transcript of the voice sample")
    return text.strip()


def speak(args: argparse.Namespace) -> None:
    from dia_ort.model import Dia

    text = read_text(args)
    options = GenerationOptions(
        top_p=args.top_p,
        temperature=args.temperature,
        top_k=args.top_k,
        sample_rate=args.sample_rate,
        max_new_tokens=args.max_new_tokens,
        cfg_scale=args.cfg_scale,
        cfg_filter_top_k=args.cfg_filter_top_k,
        seed=args.seed,
    ).validate()
    model = Dia.from_pretrained(args.model, compute_dtype=args.dtype, device=args.device)
    generation = model.start([text], None if args.voice is None else [args.voice], options)
    with tqdm(desc="speaking", unit="step", disable=args.quiet) as bar:
        for step in generation:
            bar.total = step.total
            bar.update(1)
    (codes,) = generation.codes()
    if len(codes) == 0:
        raise ValueError("the model ended the audio at once; nothing to write (try another --seed)")
    audio = model.codes_to_audio(codes, options.sample_rate)
    save_audio(args.output, audio, options.sample_rate)
    print(f"wrote {args.output} ({len(audio) / options.sample_rate:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        speak(args)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as exc:
        print(f"dia-ort: error: {exc}", file=sys.stderr)
        return 2
    return 0
