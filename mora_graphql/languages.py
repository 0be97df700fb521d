"""The target programming languages: aliases, canonical ids and display names."""

from __future__ import annotations

_LANGUAGE_ALIASES: dict[str, str] = {
    "python": "python",
    "py": "python",
    "python3": "python",
    "py3": "python",
    "javascript": "javascript",
    "js": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
    "node.js": "javascript",
    "typescript": "typescript",
    "ts": "typescript",
    "java": "java",
    "c": "c",
    "cpp": "cpp",
    "c++": "cpp",
    "cxx": "cpp",
    "csharp": "csharp",
    "c#": "csharp",
    "cs": "csharp",
    "c sharp": "csharp",
    "go": "go",
    "golang": "go",
    "rust": "rust",
    "rs": "rust",
    "ruby": "ruby",
    "rb": "ruby",
    "php": "php",
    "swift": "swift",
    "kotlin": "kotlin",
    "kt": "kotlin",
    "sql": "sql",
    "bash": "bash",
    "shell": "bash",
    "sh": "bash",
    "zsh": "bash",
    "html": "html",
    "css": "css",
    "r": "r",
    "scala": "scala",
    "lua": "lua",
    "dart": "dart",
}

SUPPORTED_LANGUAGES: frozenset[str] = frozenset(_LANGUAGE_ALIASES.values())

LANGUAGE_NAMES: dict[str, str] = {
    "python": "Python",
    "javascript": "JavaScript",
    "typescript": "TypeScript",
    "java": "Java",
    "c": "C",
    "cpp": "C++",
    "csharp": "C#",
    "go": "Go",
    "rust": "Rust",
    "ruby": "Ruby",
    "php": "PHP",
    "swift": "Swift",
    "kotlin": "Kotlin",
    "sql": "SQL",
    "bash": "Bash",
    "html": "HTML",
    "css": "CSS",
    "r": "R",
    "scala": "Scala",
    "lua": "Lua",
    "dart": "Dart",
}


def normalize_language(value: str) -> str | None:
    """The canonical lower-case id of a language name or alias, None when unknown."""
    key = " ".join(value.strip().lower().split())
    return _LANGUAGE_ALIASES.get(key)


def language_name(value: str) -> str:
    """A display name for prompts: "C++" for "cpp", the input itself when unknown."""
    canonical = normalize_language(value)
    return LANGUAGE_NAMES[canonical] if canonical else value.strip()
