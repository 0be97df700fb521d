"""All settings, read from the environment and `.env`."""

from __future__ import annotations

import secrets
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./mora.db"
SUBTITLE_PROVIDER_NAMES = frozenset({"bibigpt", "youtube", "ytdlp"})


class SettingsError(RuntimeError):
    """The configuration cannot be used; the message says how to fix it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", validate_default=True
    )

    environment: Literal["development", "production", "test"] = "development"
    secret_key: SecretStr | None = None
    log_level: str = "INFO"
    log_json: bool | None = None

    host: str = "127.0.0.1"
    port: int = 8000
    forwarded_allow_ips: str = "127.0.0.1"

    database_url: str = DEFAULT_SQLITE_URL
    database_pool_size: int = 10
    database_pool_recycle: int = 300
    database_pool_pre_ping: bool = False
    web_concurrency: int = Field(default=1, ge=1, le=64)
    database_echo: bool = False
    redis_url: str | None = None

    bibigpt_api_key: SecretStr | None = None
    bibigpt_api_url: str = "https://api.bibigpt.co/api"
    bibigpt_timeout: float = 60.0

    subtitle_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["bibigpt", "youtube", "ytdlp"]
    )
    subtitle_languages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["en", "zh-Hans", "zh-CN", "zh", "zh-Hant", "zh-TW"]
    )
    subtitle_proxy_url: str | None = None
    subtitle_timeout: float = 30.0
    subtitle_threads: int = 4
    ytdlp_cookies_file: str | None = None

    deepseek_api_key: SecretStr | None = None
    deepseek_api_url: str = "https://api.deepseek.com"
    deepseek_model: str = "deepseek-v4-flash"
    deepseek_timeout: float = 120.0
    deepseek_temperature: float = 0.2
    deepseek_max_retries: int = 3
    deepseek_retry_base_delay: float = 0.5
    llm_prompt_token_budget: int = 48_000
    llm_max_output_tokens: int = 8_192

    enable_cache: bool = True
    cache_ttl: int = 86_400
    video_cache_ttl: int = 7 * 86_400
    no_subtitle_cache_ttl: int = 600
    max_video_duration: int = 7_200
    max_requests_per_minute: int = 10
    max_subtitles_bytes: int = 2_000_000
    max_video_url_length: int = 2_048

    access_token_ttl: int = 900
    jwt_issuer: str = "mora-graphql"
    jwt_audience: str = "mora-graphql"

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    graphiql: bool | None = None

    refresh_token_ttl: int = 30 * 86_400
    registration_enabled: bool = True

    rate_limit_enabled: bool = True
    rate_limit_storage_url: str | None = None
    rate_limit_key_prefix: str = "mora"
    rate_limit_max_keys: int = 100_000
    rate_limit_per_ip: str = "600/minute"
    login_rate_limit_per_ip: str = "30/minute"
    login_rate_limit_per_account: str = "10/15 minutes"
    register_rate_limit_per_ip: str = "10/hour"
    register_rate_limit_per_account: str = "5/hour"
    max_subscriptions_per_user: int = 20
    max_subscriptions_per_connection: int = 10

    graphql_max_depth: int = 8
    graphql_max_aliases: int = 15
    graphql_max_tokens: int = 1_000
    graphql_max_directives: int = 50
    graphql_max_document_length: int = 32_768
    graphql_introspection: bool | None = None
    graphql_field_suggestions: bool | None = None
    max_request_bytes: int = 4 * 1_048_576
    max_ws_message_bytes: int = 4 * 1_048_576
    ws_connection_init_timeout: float = 10.0

    response_cache: bool = True
    response_cache_max_bytes: int = Field(default=64 * 1_048_576, ge=0)
    response_cache_ttl: int = Field(default=3_600, ge=1)
    persisted_queries: Literal["auto", "allowlist", "off"] = "auto"
    persisted_queries_allowlist: str | None = None
    persisted_queries_max_entries: int = Field(default=10_000, ge=1)

    job_backend: Literal["auto", "inprocess", "procrastinate"] = "auto"
    job_concurrency: int = 8
    worker_heartbeat_interval: float = 5.0
    stalled_job_timeout: float = 20.0
    reconcile_interval: float = 15.0
    max_session_attempts: int = Field(default=5, ge=1)
    worker_shutdown_timeout: float = 30.0
    checkpoint_interval: float = 1.0
    checkpoint_rate: float = Field(default=50.0, ge=0.0)
    delta_flush_interval: float = Field(default=0.005, ge=0.0, le=5.0)
    delta_flush_rate: float = Field(default=2000.0, ge=0.0)
    event_publish_linger: float = Field(default=0.01, ge=0.0, le=1.0)
    cancel_wait: float = Field(default=5.0, ge=0.0)
    event_retention: int = 10_000
    event_bus_max_sessions: int = 1_000
    event_idle_ttl: int = 3_600
    subscriber_buffer: int = 1_000

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("subtitle_providers", "subtitle_languages", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("subtitle_providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        names = [name.lower() for name in value]
        unknown = sorted(set(names) - SUBTITLE_PROVIDER_NAMES)
        if unknown:
            raise ValueError(
                f"unknown subtitle provider(s) {', '.join(unknown)}; "
                f"use {', '.join(sorted(SUBTITLE_PROVIDER_NAMES))}"
            )
        return list(dict.fromkeys(names))

    @field_validator(
        "rate_limit_per_ip",
        "login_rate_limit_per_ip",
        "login_rate_limit_per_account",
        "register_rate_limit_per_ip",
        "register_rate_limit_per_account",
    )
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        from limits import parse

        parse(value)
        return value

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        weak_key = self.secret_key is None or len(self.secret_key.get_secret_value()) < 32
        if self.environment == "production" and weak_key:
            raise SettingsError(
                "SECRET_KEY must be set to a random string of at least 32 characters "
                "when ENVIRONMENT=production (for example: "
                'python -c "import secrets; print(secrets.token_urlsafe(48))")'
            )
        if self.job_backend == "procrastinate" and (self.is_sqlite or not self.redis_url):
            raise SettingsError(
                "JOB_BACKEND=procrastinate needs a PostgreSQL DATABASE_URL and REDIS_URL "
                "(events must cross processes)."
            )
        if self.secret_key is None:
            self.secret_key = SecretStr(secrets.token_urlsafe(48))
        return self

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def multiprocess_problem(self, workers: int) -> str | None:
        """Why `workers` API processes could not share this deployment's state, or None."""
        if workers <= 1:
            return None
        if not self.redis_url:
            return (
                "several API processes need REDIS_URL: events, caches and limits would "
                "otherwise be split between processes"
            )
        if not self.uses_procrastinate:
            return (
                "several API processes need the distributed job queue (PostgreSQL DATABASE_URL "
                "plus REDIS_URL, JOB_BACKEND=auto or procrastinate) and `mora worker` processes; "
                "the embedded in-process runner belongs to one process"
            )
        return None

    @property
    def uses_procrastinate(self) -> bool:
        """PostgreSQL + Redis means the distributed topology unless JOB_BACKEND says otherwise."""
        if self.job_backend == "auto":
            return not self.is_sqlite and bool(self.redis_url)
        return self.job_backend == "procrastinate"

    @property
    def graphiql_enabled(self) -> bool:
        return (not self.is_production) if self.graphiql is None else self.graphiql

    @property
    def introspection_enabled(self) -> bool:
        if self.graphql_introspection is None:
            return not self.is_production
        return self.graphql_introspection

    @property
    def field_suggestions_enabled(self) -> bool:
        if self.graphql_field_suggestions is None:
            return not self.is_production
        return self.graphql_field_suggestions

    @property
    def rate_limit_storage(self) -> str:
        """A `limits` storage URI: the explicit setting, else Redis when configured, else memory."""
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        if self.redis_url:
            scheme, _, rest = self.redis_url.partition("://")
            if scheme == "unix":
                return f"async+redis+unix://{rest}"
            return f"async+{scheme}://{rest}"
        return "async+memory://"

    @property
    def json_logs(self) -> bool:
        return self.is_production if self.log_json is None else self.log_json

    @property
    def signing_key(self) -> str:
        assert self.secret_key is not None
        return self.secret_key.get_secret_value()


@lru_cache
def get_settings() -> Settings:
    return Settings()
