from __future__ import annotations

import pytest

from mora_graphql.languages import SUPPORTED_LANGUAGES, language_name, normalize_language


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Python", "python"),
        (" py ", "python"),
        ("python3", "python"),
        ("JavaScript", "javascript"),
        ("js", "javascript"),
        ("node", "javascript"),
        ("TypeScript", "typescript"),
        ("ts", "typescript"),
        ("Java", "java"),
        ("C", "c"),
        ("cpp", "cpp"),
        ("C++", "cpp"),
        ("csharp", "csharp"),
        ("C#", "csharp"),
        ("go", "go"),
        ("Golang", "go"),
        ("rust", "rust"),
        ("ruby", "ruby"),
        ("PHP", "php"),
        ("swift", "swift"),
        ("Kotlin", "kotlin"),
        ("SQL", "sql"),
        ("bash", "bash"),
        ("shell", "bash"),
        ("HTML", "html"),
        ("css", "css"),
        ("R", "r"),
        ("scala", "scala"),
        ("lua", "lua"),
        ("dart", "dart"),
        ("cobol", None),
        ("", None),
    ],
)
def test_normalize_language(value: str, expected: str | None) -> None:
    assert normalize_language(value) == expected
    if expected is not None:
        assert expected in SUPPORTED_LANGUAGES


def test_supported_languages_are_canonical() -> None:
    assert all(normalize_language(lang) == lang for lang in SUPPORTED_LANGUAGES)
    assert len(SUPPORTED_LANGUAGES) == 21


def test_language_name() -> None:
    assert language_name("c++") == "C++"
    assert language_name("golang") == "Go"
    assert language_name(" Elixir ") == "Elixir"
