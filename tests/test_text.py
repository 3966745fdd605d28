"""encode_text against docs/generation.md section 4: bytes, speaker tags, the window, refused input."""

from __future__ import annotations

import numpy as np
import pytest

from dia_ort.text import encode_text


def test_text_is_its_utf8_bytes_with_tags_as_bytes_1_and_2():
    ids = encode_text("[S1] Hé! [S2] (laughs)", 64)
    expected = b"\x01 H\xc3\xa9! \x02 (laughs)"
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.frombuffer(expected, dtype=np.uint8))


def test_the_window_counts_bytes_after_tags_are_replaced():
    assert len(encode_text("[S1]" * 10, 10)) == 10  # 40 characters, 10 bytes: fits exactly
    assert len(encode_text("é" * 5, 10)) == 10


def test_a_text_over_the_window_is_refused_not_truncated():
    with pytest.raises(ValueError) as error:
        encode_text("[S1] " + "a" * 8, 9)  # 10 bytes
    assert str(error.value) == (
        "text is 10 bytes but the model reads at most 9; pass long_form=True (--long-form on the command "
        "line) to generate it in parts, or split it into shorter requests"
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_refused(text):
    with pytest.raises(ValueError) as error:
        encode_text(text, 16)
    assert str(error.value) == "text is empty; give a line such as '[S1] Hello there.'"


def test_non_str_is_refused_by_type_name():
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        encode_text(b"[S1] hi", 16)


def test_unknown_speaker_tags_are_listed_sorted_case_insensitively():
    with pytest.raises(ValueError) as error:
        encode_text("[S1] a [s1] b [S10] c [S3] d [S3]", 64)
    assert "['[S10]', '[S3]', '[s1]']" in str(error.value)


def test_a_lone_surrogate_is_named_with_its_position():
    with pytest.raises(ValueError) as error:
        encode_text("[S1] ab\ud800c", 64)
    assert (
        str(error.value) == "text is not valid unicode: '\\ud800' at character 7 is half of a surrogate pair"
    )
    assert isinstance(error.value.__cause__, UnicodeEncodeError)
