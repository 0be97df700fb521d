"""What PostgreSQL text and JSONB can hold."""

from __future__ import annotations

from mora_graphql.db import storable, storable_text


def test_nul_is_dropped_and_lone_surrogates_replaced() -> None:
    assert storable_text("pri\x00nt(1)\x00") == "print(1)"
    assert storable_text("a\ud800b") == "a\ufffdb"
    assert storable_text("\ud83d\ude00") == "\U0001f600"  # a surrogate pair is one character
    assert storable_text("plain é 中文 \\u0000") == "plain é 中文 \\u0000"


def test_json_values_are_cleaned_through_and_left_alone_when_clean() -> None:
    value = {"segments": [{"description": "Lo\x00ad", "startLine": 1}], "t\x00": ("x\ud800",)}
    assert storable(value) == {
        "segments": [{"description": "Load", "startLine": 1}],
        "t": ["x\ufffd"],
    }
    clean = [{"text": "caption", "start": 0.0}]
    assert storable(clean) is clean
    assert storable(None) is None
    assert storable(1.5) == 1.5
