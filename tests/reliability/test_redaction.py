"""Redaction removes secrets but keeps Mora's own hints readable."""

from __future__ import annotations

import pytest

from mora_graphql.logging import redact


def test_the_authentication_hint_is_kept_whole() -> None:
    hint = "Authentication is required: send 'Authorization: Bearer <token>'."
    assert redact(hint) == hint


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("password: hunter22", "hunter22"),
        ("token=<x>abcdef", "abcdef"),
    ],
)
def test_secrets_beside_the_scheme_are_still_removed(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert "[REDACTED]" in redacted
