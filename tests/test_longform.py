"""Long-form scripts: the splitter, the prompts that carry the voices from part to part, the joins."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dia_ort import Dia
from dia_ort.longform import CROSSFADE_SECONDS, Crossfade, Spoken, _fitting_prompt, part_seed
from dia_ort.script import CHARS_PER_SECOND, ScriptPart, estimated_seconds, model_bytes, split_script
from export.architecture import TINY

DIALOGUE = (
    "[S1] Welcome back to the show. Today we talk about trains. "
    "[S2] Trains! (laughs) My favourite topic, honestly. "
    "[S1] I know. So, where do we start? "
    "[S2] At the beginning, with steam, coal, and a lot of noise. "
    "[S1] Fair enough."
)


def letters(text: str) -> str:
    """A script without speaker tags and spaces: what the parts must hold between them, in order."""
    return re.sub(r"\[S[12]\]|\s", "", text)


def check_parts(parts, text, max_bytes, seconds):
    assert letters("".join(p.body for p in parts)) == letters(text)  # nothing lost, doubled or reordered
    for part in parts:
        assert model_bytes(part.text) <= max_bytes
        assert estimated_seconds(part.text) <= seconds
        assert part.text.startswith(part.speaker)


def test_a_script_that_fits_is_one_part():
    (part,) = split_script(DIALOGUE, 1024, 60)
    assert part.text == DIALOGUE.strip() and part.speaker == "[S1]" and not part.continues


def test_parts_are_cut_at_speaker_turns_first():
    parts = split_script(DIALOGUE, 1024, 4.6)  # the longest turn is 4.5 s, no two turns fit together
    check_parts(parts, DIALOGUE, 1024, 4.6)
    assert [p.speaker for p in parts] == ["[S1]", "[S2]", "[S1]", "[S2]", "[S1]"]
    assert not any(p.continues for p in parts)
    packed = split_script(DIALOGUE, 1024, 9)  # short turns are packed together while they fit
    check_parts(packed, DIALOGUE, 1024, 9)
    assert len(packed) < len(parts) and "[S2]" in packed[-1].text


def test_a_long_turn_is_cut_at_sentence_ends():
    turn = "[S1] " + " ".join(f"This is sentence number {i} of a long turn." for i in range(6))
    parts = split_script(turn, 1024, 4)
    check_parts(parts, turn, 1024, 4)
    assert all(p.text.endswith(".") for p in parts)
    assert [p.continues for p in parts] == [False] + [True] * (len(parts) - 1)
    assert all(p.speaker == "[S1]" for p in parts)


def test_an_overlong_sentence_is_cut_at_commas_then_between_words():
    sentence = "[S2] " + ", ".join(f"item {i} of the list" for i in range(12)) + "."
    parts = split_script(sentence, 1024, 2)
    check_parts(parts, sentence, 1024, 2)
    assert all(p.text.endswith((",", ".")) for p in parts)
    run_on = "[S2] " + " ".join(f"word{i}" for i in range(60))
    parts = split_script(run_on, 60, 100)
    check_parts(parts, run_on, 60, 100)
    assert len(parts) > 1


def test_tags_and_non_verbals_are_never_cut():
    text = "[S1] Well (clears throat) this is it, (sighs deeply and long) then. [S2] (laughs) Sure, sure."
    for seconds in (1.5, 2, 3, 5):
        parts = split_script(text, 1024, seconds)
        joined = " ".join(p.text for p in parts)
        for nonverbal in ("(clears throat)", "(sighs deeply and long)", "(laughs)"):
            assert nonverbal in joined
        for part in parts:
            assert part.text.count("(") == part.text.count(")")
            assert re.fullmatch(r"\[S[12]\] .*", part.text)


def test_non_ascii_is_measured_in_bytes_and_never_cut_inside_a_character():
    text = "[S1] Привет, как дела? Сегодня мы говорим о поездах. [S2] Ça va très bien, merci! 電車は好きです。とても。"
    max_bytes = 60
    parts = split_script(text, max_bytes, 100)
    check_parts(parts, text, max_bytes, 100)
    assert len(parts) > 2
    assert parts[-1].text == "[S2] とても。" and parts[-1].continues  # cut after a CJK full stop


def test_odd_scripts():
    # a tag with nothing after it is dropped, not left dangling at the end of a part
    parts = split_script("[S1] One sentence here. [S2] [S1] Another one.", 1024, 1.5)
    assert all(not p.text.endswith("]") for p in parts) and [p.speaker for p in parts] == ["[S1]", "[S1]"]
    # text with no spaces or punctuation is cut between characters
    text = "[S1] " + "電車" * 40
    parts = split_script(text, 60, 100)
    check_parts(parts, text, 60, 100)
    # the lead (an audio prompt's transcript) widens the first part only
    long_turn = "[S1] " + " ".join(f"Sentence {i} is here." for i in range(12))
    parts = split_script(long_turn, 1024, 3, lead_seconds=5)
    assert estimated_seconds(parts[0].text) > 3 and all(estimated_seconds(p.text) <= 3 for p in parts[1:])


def test_splitter_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="too long for one part"):
        split_script("[S1] (" + "x" * 100 + ")", 50, 100)
    with pytest.raises(ValueError, match="empty"):
        split_script("   ", 100, 10)
    with pytest.raises(ValueError, match=r"\[S3\]"):
        split_script("[S1] Hi. [S3] Who?", 100, 10)
    for seconds in (0, 0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="long_form_seconds"):
            split_script("[S1] Hi.", 100, seconds)


def sine(n: int, freq: float, phase: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / 44100 + phase)).astype(np.float32)


def test_crossfade_joins_without_a_jump():
    fade = round(CROSSFADE_SECONDS * 44100)
    a, b = sine(20000, 220, 0.0), sine(20000, 330, 2.5)
    joiner = Crossfade(fade)
    out = [joiner.push(a[:7000]), joiner.push(a[7000:]), joiner.next_part()]
    out += [joiner.push(b[:100]), joiner.push(b[100:]), joiner.finish()]
    joined = np.concatenate(out)
    assert len(joined) == len(a) + len(b) - fade
    np.testing.assert_array_equal(joined[: len(a) - fade], a[: len(a) - fade])
    np.testing.assert_array_equal(joined[len(a) :], b[fade:])
    own_step = max(np.abs(np.diff(a)).max(), np.abs(np.diff(b)).max())
    steps = np.abs(np.diff(joined))
    for join in (len(a) - fade, len(a)):  # into and out of the fade: no jump
        assert steps[join - 1] <= own_step * 1.01
    # inside it two signals add, weighted cos and sin: their slopes add up to sqrt(2) times at most
    assert steps.max() <= own_step * 1.5
    hard_cut = np.concatenate([a, b])
    assert np.abs(np.diff(hard_cut)).max() > 10 * own_step  # what the fade saves us from
    power = joined[len(a) - fade : len(a)] ** 2  # equal power: the mix is not quieter in the middle
    assert power.mean() > 0.5 * (a**2).mean()


def test_crossfade_of_a_part_shorter_than_the_fade():
    joiner = Crossfade(100)
    a, b, c = sine(500, 200, 0), sine(40, 300, 1), sine(500, 250, 2)
    out = [
        joiner.push(a),
        joiner.next_part(),
        joiner.push(b),
        joiner.next_part(),
        joiner.push(c),
        joiner.finish(),
    ]
    joined = np.concatenate(out)
    assert len(joined) == 500 + 40 + 500 - 40 - 100  # a fades into all of b, and that mix into c
    own_step = max(np.abs(np.diff(x)).max() for x in (a, b, c))
    assert np.abs(np.diff(joined)).max() <= own_step * 1.5
    joiner = Crossfade(100)  # a part with no audio at all: a fades straight into c
    out = [joiner.push(a), joiner.next_part(), joiner.next_part(), joiner.push(c), joiner.finish()]
    joined = np.concatenate(out)
    assert len(joined) == 900 and np.abs(np.diff(joined)).max() <= own_step * 1.5


@pytest.fixture(scope="module")
def recorded_starts(tiny_dia):
    """Every (text, prompt codes, generation) a long-form run started, and its audio."""
    starts = []
    original = Dia.start

    def spy(self, texts, prompts=None, options=None):
        generation = original(self, texts, prompts, options)
        starts.append((texts[0], prompts[0], generation))
        return generation

    Dia.start = spy
    try:
        audio = tiny_dia.generate(DIALOGUE, long_form=True, long_form_seconds=1.5, seed=3, max_new_tokens=40)
    finally:
        Dia.start = original
    return starts, audio


def test_each_part_is_prompted_with_the_previous_parts_codes_and_text(recorded_starts):
    starts, _ = recorded_starts
    parts = split_script(DIALOGUE, TINY.encoder.max_length // 2, 1.5)
    assert len(starts) == len(parts) > 3
    assert starts[0][:2] == (parts[0].text, None)
    for k in range(1, len(parts)):
        text, prompt, _ = starts[k]
        (previous_codes,) = starts[k - 1][2].codes()
        np.testing.assert_array_equal(prompt, previous_codes)  # the codes themselves, no codec round trip
        assert text == f"{parts[k - 1].text} {parts[k].body if parts[k].continues else parts[k].text}"


def reference_join(waves: list[np.ndarray], fade: int) -> np.ndarray:
    """Parts joined with an equal-power crossfade of `fade` samples, written out plainly."""
    out = waves[0]
    for wave in waves[1:]:
        n = min(fade, len(out), len(wave))
        angle = (np.arange(n) + 0.5) / n * (np.pi / 2)
        mixed = (out[len(out) - n :] * np.cos(angle) + wave[:n] * np.sin(angle)).astype(np.float32)
        out = np.concatenate([out[: len(out) - n], mixed, wave[n:]])
    return out


def test_long_form_audio_is_the_parts_decoded_and_crossfaded(tiny_dia, recorded_starts):
    starts, audio = recorded_starts
    waves = [tiny_dia.decode_codes(generation.codes()[0]) for _, _, generation in starts]
    want = reference_join(waves, round(CROSSFADE_SECONDS * 44100))
    assert len(audio) == len(want)
    np.testing.assert_allclose(audio, want, rtol=0, atol=1e-6)
    assert [generation.options.seed for _, _, generation in starts] == [
        part_seed(3, k) for k in range(len(starts))
    ]


def test_long_form_is_reproducible_and_streams_the_same_audio(tiny_dia, recorded_starts):
    _, audio = recorded_starts
    kwargs = dict(long_form=True, long_form_seconds=1.5, seed=3, max_new_tokens=40)
    np.testing.assert_array_equal(tiny_dia.generate(DIALOGUE, **kwargs), audio)
    streamed = np.concatenate(list(tiny_dia.generate_stream(DIALOGUE, first_chunk_frames=16, **kwargs)))
    np.testing.assert_array_equal(streamed, audio)
    assert not np.array_equal(tiny_dia.generate(DIALOGUE, **{**kwargs, "seed": 4}), audio)


def test_resampled_long_form_stream_equals_generate(tiny_dia):
    kwargs = dict(long_form=True, long_form_seconds=2, seed=1, max_new_tokens=30, sample_rate=22050)
    want = tiny_dia.generate(DIALOGUE, **kwargs)
    got = np.concatenate(list(tiny_dia.generate_stream(DIALOGUE, first_chunk_frames=16, **kwargs)))
    assert len(got) == len(want) and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_script_that_fits_one_generation_is_a_plain_call(tiny_dia):
    text = "[S1]hi  there.\n[S2] Yes?"  # left as it is: not re-spaced by the splitter
    kwargs = dict(seed=11, max_new_tokens=30)
    np.testing.assert_array_equal(
        tiny_dia.generate(text, long_form=True, **kwargs), tiny_dia.generate(text, **kwargs)
    )


def test_a_previous_part_too_long_for_the_window_is_not_a_prompt(caplog):
    """At the real model's size: a 10 s part leaves a previous part up to about 22 s as its prompt."""
    room = 3072 - 15 - 2
    frame_rate = 44100 / 512  # the DAC's frames a second
    part = ScriptPart("[S1] " + "x" * round(10 * CHARS_PER_SECOND), "[S1]", continues=False)
    frames = round(20 * 44100 / 512)
    previous = Spoken(np.zeros((frames, 9), dtype=np.int64), "[S2] Before.")
    assert _fitting_prompt(previous, part, 1024, room, frame_rate) is previous
    longer = Spoken(np.zeros((round(24 * 44100 / 512), 9), dtype=np.int64), "[S2] Before.")
    assert _fitting_prompt(longer, part, 1024, room, frame_rate) is None
    wordy = Spoken(previous.codes, "[S2] " + "y" * 900)  # the two texts overflow the text window
    assert _fitting_prompt(wordy, part, 1024, room, frame_rate) is None
    assert caplog.text.count("does not fit as the prompt") == 2


def test_parts_with_no_audio_leave_the_script_going(tiny_dia, ends_at_once, caplog):
    audio = tiny_dia.generate(DIALOGUE, long_form=True, long_form_seconds=1.5, temperature=0)
    assert audio.dtype == np.float32 and len(audio) == 0
    parts = len(split_script(DIALOGUE, TINY.encoder.max_length // 2, 1.5))
    assert caplog.text.count("ended at once, with no audio") == parts


def test_long_form_with_an_audio_prompt_keeps_it_for_the_second_part(tiny_dia, monkeypatch):
    prompt = np.random.default_rng(5).integers(0, 1024, size=(15, 9))
    prompts = []
    original = Dia.start

    def spy(self, texts, audio_prompts=None, options=None):
        generation = original(self, texts, audio_prompts, options)
        prompts.append((audio_prompts[0], generation))
        return generation

    monkeypatch.setattr(Dia, "start", spy)
    tiny_dia.generate(
        "[S1] Me first. " + DIALOGUE,
        prompt,
        long_form=True,
        long_form_seconds=1,
        temperature=0,
        max_new_tokens=30,
    )
    assert len(prompts) > 1
    np.testing.assert_array_equal(prompts[0][0], prompt)
    (first_codes,) = prompts[0][1].codes()
    np.testing.assert_array_equal(prompts[1][0], np.concatenate([prompt, first_codes]))


def test_part_seeds_differ_and_the_first_is_the_callers():
    assert part_seed(7, 0) == 7 and part_seed(None, 3) is None
    assert len({part_seed(7, k) for k in range(1, 50)}) == 49


def test_text_over_the_window_names_long_form(tiny_dia):
    with pytest.raises(ValueError, match="long_form=True"):
        tiny_dia.generate("[S1] " + "word " * 40)
