from pathlib import Path

import pytest

from mora_graphql.config import Settings, SettingsError


def test_env_example_documents_every_setting(repo_root: Path) -> None:
    documented = {
        line.split("=", 1)[0]
        for line in (repo_root / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    missing = sorted(
        name.upper() for name in Settings.model_fields if name.upper() not in documented
    )
    assert missing == []


def test_production_requires_a_strong_secret_key() -> None:
    with pytest.raises(SettingsError, match="SECRET_KEY"):
        Settings(_env_file=None, environment="production")  # type: ignore[call-arg]
    with pytest.raises(SettingsError, match="SECRET_KEY"):
        Settings(_env_file=None, environment="production", secret_key="short")  # type: ignore[call-arg]
    strong = Settings(_env_file=None, environment="production", secret_key="k" * 40)  # type: ignore[call-arg]
    assert strong.graphiql_enabled is False


def test_distributed_backend_needs_postgres_and_redis() -> None:
    with pytest.raises(SettingsError, match="JOB_BACKEND"):
        Settings(_env_file=None, job_backend="procrastinate")  # type: ignore[call-arg]
    auto = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url="postgresql+asyncpg://u@h/db",
        redis_url="redis://h:6379/0",
        cors_origins="https://a.example, https://b.example",
    )
    assert auto.uses_procrastinate
    assert auto.cors_origins == ["https://a.example", "https://b.example"]
