"""Property-based tests of every public entry point: any input gives valid audio or a clear error.

Valid audio is finite float32 in [-1, 1] whose length its frames imply; a clear error is a
`ValueError` or `TypeError` whose message names the value at fault. The server's request body is in
tests/test_server_load.py, with the server it runs against.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dia_ort.cli import main
from export.architecture import TINY

TEXT_WINDOW = TINY.encoder.max_length  # bytes the tiny model's encoder reads
HOP = 512  # samples per frame at 44.1 kHz
FEW_STEPS = 12  # max_new_tokens of the generations the properties run

PROPERTIES = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run, so CI cannot flake on a new one
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text: anything unicode, plus the pieces that make Dia's text special.
PIECES = st.sampled_from(
    ["[S1] ", "[S2] ", "[S3]", "[s1]", "[S", "]", "(laughs)", "\x00", "\x01", "é", "漢", "\n", " "]
)
TEXTS = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(PIECES, st.text(max_size=6)), max_size=12).map("".join),
    st.integers(0, 3).map(lambda extra: "[S1] " + "a" * (TEXT_WINDOW - 3 - 1 + extra)),  # at the window
    st.just("[S1] \ud800 lone surrogate"),
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 0.5, None, "1", True, [1]]),
)


def assert_valid_audio(audio: np.ndarray, max_frames: int, rate: int = 44100) -> None:
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all()
    assert np.abs(audio).max(initial=0) <= 1
    if rate == 44100:
        assert len(audio) % HOP == 0 and len(audio) <= max_frames * HOP


def text_refusal(text: str) -> str | None:
    """The start of the refusal the rules give `text` (docs/generation.md section 4), or None where the
    model reads it: empty, then speaker tags other than [S1] and [S2], then half a surrogate pair,
    then over the window, counting each tag as one byte."""
    if not text.strip():
        return "text is empty"
    if {tag for tag in re.findall(r"\[S\d+\]", text, re.IGNORECASE)} - {"[S1]", "[S2]"}:
        return "unknown speaker tags"
    if any(0xD800 <= ord(character) <= 0xDFFF for character in text):
        return "text is not valid unicode"
    size = len(text.encode().replace(b"[S1]", b"\x01").replace(b"[S2]", b"\x02"))
    return f"text is {size} bytes but the model reads at most {TEXT_WINDOW}" if size > TEXT_WINDOW else None


def assert_clear(error: Exception, *names: str) -> None:
    """The error is ValueError/TypeError, and its message names one of `names` (when given)."""
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    message = str(error)
    assert message and "Traceback" not in message
    if names:
        assert any(name in message for name in names), (names, message)


@PROPERTIES
@given(text=TEXTS)
def test_generate_any_text(tiny_dia, text):
    """Audio where the rules read the text, else exactly the refusal they give it."""
    refusal = text_refusal(text)
    if refusal is not None:
        with pytest.raises(ValueError, match=f"^{re.escape(refusal)}"):
            tiny_dia.generate(text, max_new_tokens=FEW_STEPS, seed=0)
        return
    assert_valid_audio(tiny_dia.generate(text, max_new_tokens=FEW_STEPS, seed=0), FEW_STEPS)


def test_text_exactly_at_the_window_and_one_byte_past(tiny_dia):
    at = "[S1] " + "a" * (TEXT_WINDOW - 1 - 1)  # [S1] is one byte, then a space
    assert_valid_audio(tiny_dia.generate(at, max_new_tokens=FEW_STEPS, seed=0), FEW_STEPS)
    with pytest.raises(
        ValueError, match=f"{TEXT_WINDOW + 1} bytes but the model reads at most {TEXT_WINDOW}"
    ):
        tiny_dia.generate(at + "a", max_new_tokens=FEW_STEPS)


SAMPLING = ("temperature", "top_p", "top_k", "cfg_scale", "cfg_filter_top_k", "seed")


@settings(PROPERTIES, max_examples=60)
@given(
    name=st.sampled_from(SAMPLING),
    value=NUMBERS,
    max_new_tokens=st.one_of(st.integers(-5, FEW_STEPS), st.sampled_from([2**70, 1.5, None, "3"])),
)
def test_generate_any_sampling_value(tiny_dia, name, value, max_new_tokens):
    """One sampling value at a time, so that each meets NaN, inf, huge, negative and wrong types."""
    try:
        audio = tiny_dia.generate("[S1] Hi.", max_new_tokens=max_new_tokens, **{name: value})
    except (ValueError, TypeError) as error:
        assert_clear(error, name, "max_new_tokens")
    else:
        assert isinstance(max_new_tokens, int)
        assert_valid_audio(audio, max_new_tokens)
        if name == "temperature" and value != 0:  # sampled, not collapsed to one token by NaN
            codes = tiny_dia.generate_codes(["[S1] Hi."], max_new_tokens=max_new_tokens, temperature=value)[0]
            assert len(np.unique(codes)) > 1 or len(codes) < 3


@PROPERTIES
@given(sample_rate=st.one_of(st.integers(-10, 200_000), st.sampled_from([0.5, None, "16000", True])))
def test_generate_any_sample_rate(tiny_dia, sample_rate):
    try:
        audio = tiny_dia.generate("[S1] Hi.", max_new_tokens=FEW_STEPS, seed=0, sample_rate=sample_rate)
    except (ValueError, TypeError) as error:
        assert_clear(error, "sample_rate")
    else:
        assert_valid_audio(audio, FEW_STEPS, sample_rate)
        assert len(audio) <= math.ceil(FEW_STEPS * HOP * sample_rate / 44100) + 1


# Arrays of every dtype and rank, with NaN, inf and huge values among the floats.
ARRAYS = hnp.arrays(
    dtype=st.one_of(
        hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.boolean_dtypes(),
        hnp.complex_number_dtypes(), st.just(np.dtype(object)), st.just(np.dtype("U3")),
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40),
)  # fmt: skip


@PROPERTIES
@given(audio=ARRAYS, rate=st.one_of(st.sampled_from([8000, 44100, 0, -1]), st.just(2.5)))
def test_encode_audio_any_array(tiny_dia, audio, rate):
    try:
        codes = tiny_dia.encode_audio(audio, rate)
    except (ValueError, TypeError) as error:
        assert_clear(error, "audio", "sample_rate", "rate")
    else:
        assert codes.dtype == np.int64 and codes.ndim == 2 and codes.shape[1] == TINY.decoder.num_channels
        assert len(codes) > 0 and ((codes >= 0) & (codes < 1024)).all()


@PROPERTIES
@given(prompt=ARRAYS)
def test_any_array_as_an_audio_prompt(tiny_dia, prompt):
    try:
        audio = tiny_dia.generate("[S1] Hi.", audio_prompt=prompt, max_new_tokens=FEW_STEPS, seed=0)
    except (ValueError, TypeError) as error:
        assert_clear(error, "audio", "codes", "prompt", "window")
    else:
        assert_valid_audio(audio, FEW_STEPS)


@PROPERTIES
@given(
    codes=ARRAYS
    | hnp.arrays(np.int64, st.tuples(st.integers(0, 5), st.just(9)), elements=st.integers(-3, 1100))
)
def test_decode_codes_any_array(tiny_dia, codes):
    try:
        audio = tiny_dia.decode_codes(codes)
    except (ValueError, TypeError) as error:
        assert_clear(error, "codes")
    else:
        assert_valid_audio(audio, len(codes))
        assert len(audio) == len(codes) * HOP


@PROPERTIES
@given(text=TEXTS, chunk=st.sampled_from([0, -1, 1, 8, 20, 2.5, None]))
def test_generate_stream_any_input_fails_before_the_first_chunk(tiny_dia, text, chunk):
    """Bad input is refused when the stream is made (chunk sizes first, then the text); a good one
    streams the audio `generate` makes."""
    good_chunk = isinstance(chunk, int) and chunk >= 1
    refusal = "chunk_frames must be a positive number" if not good_chunk else text_refusal(text)
    if refusal is not None:
        with pytest.raises(ValueError, match=f"^{re.escape(refusal)}"):
            tiny_dia.generate_stream(text, chunk_frames=chunk, max_new_tokens=FEW_STEPS, seed=0)
        return
    stream = tiny_dia.generate_stream(text, chunk_frames=chunk, max_new_tokens=FEW_STEPS, seed=0)
    joined = np.concatenate([np.zeros(0, np.float32), *stream])
    assert_valid_audio(joined, FEW_STEPS)
    np.testing.assert_array_equal(joined, tiny_dia.generate(text, max_new_tokens=FEW_STEPS, seed=0))


@PROPERTIES
@given(texts=st.lists(TEXTS, max_size=3))
def test_generate_batch_any_texts(tiny_dia, texts):
    """Audio for every text where the rules read them all, else the refusal of the first they refuse."""
    refusals = [r for r in map(text_refusal, texts) if r is not None]
    refusal = "texts is empty" if not texts else next(iter(refusals), None)
    if refusal is not None:
        with pytest.raises(ValueError, match=f"^{re.escape(refusal)}"):
            tiny_dia.generate_batch(texts, max_new_tokens=FEW_STEPS, seed=0)
        return
    audios = tiny_dia.generate_batch(texts, max_new_tokens=FEW_STEPS, seed=0)
    assert len(audios) == len(texts)
    for audio in audios:
        assert_valid_audio(audio, FEW_STEPS)


@settings(PROPERTIES, max_examples=10)
@given(
    script=st.lists(st.one_of(PIECES, st.text(max_size=30)), min_size=1, max_size=30).map("".join),
    seconds=st.sampled_from([0.5, 3.0, 10.0, 0, -1, float("nan")]),
)
def test_long_form_any_script(tiny_dia, script, seconds):
    try:
        audio = tiny_dia.generate(
            script, long_form=True, long_form_seconds=seconds, max_new_tokens=FEW_STEPS, seed=0
        )
    except (ValueError, TypeError) as error:
        assert_clear(error, "text", "speaker tags", "bytes", "long_form_seconds", "unicode", "script")
    else:
        assert np.isfinite(audio).all() and np.abs(audio).max(initial=0) <= 1 and audio.dtype == np.float32


@settings(PROPERTIES, max_examples=15)
@given(
    text=TEXTS.filter(lambda t: not t.startswith("-")),
    flag=st.sampled_from(
        ["--temperature", "--top-p", "--cfg-scale", "--seed", "--max-new-tokens", "--sample-rate"]
    ),
    value=st.sampled_from(["nan", "inf", "-1", "0", "1e309", "x", "", "3"]),
)
def test_cli_speak_any_input_exits_cleanly(tiny_folder, tmp_path_factory, capsys, text, flag, value):
    """Exit 0 with a file, or 2 with a message on stderr and no file: never a traceback."""
    out = tmp_path_factory.mktemp("cli") / "out.wav"
    argv = [
        "speak",
        text,
        "--model",
        str(tiny_folder),
        "-o",
        str(out),
        "--max-new-tokens",
        str(FEW_STEPS),
        flag,
        value,
    ]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse refuses a value of the wrong type
        code = exit.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 0:
        assert out.is_file()
    else:
        assert err.strip() and not out.exists()
