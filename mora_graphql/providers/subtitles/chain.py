"""The subtitle provider chain, built from SUBTITLE_PROVIDERS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import httpx

from mora_graphql.config import Settings
from mora_graphql.models import Platform
from mora_graphql.providers.subtitles.base import SubtitleProvider
from mora_graphql.providers.subtitles.bibigpt import BibiGPTProvider
from mora_graphql.providers.subtitles.blocking import BlockingPool, SessionFactory
from mora_graphql.providers.subtitles.youtube import YouTubeTranscriptProvider
from mora_graphql.providers.subtitles.ytdlp import YoutubeDLFactory, YtDlpProvider


class _KeylessOptions(TypedDict):
    languages: Sequence[str]
    timeout: float
    proxy_url: str | None


class SubtitleSources:
    """Builds the configured providers in order; BibiGPT only when its key is set."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http
        self.pool = BlockingPool(settings.subtitle_threads)
        # Injection points for the blocking libraries' HTTP layers (tests point them at
        # local servers); None means the libraries' defaults.
        self.youtube_session_factory: SessionFactory | None = None
        self.ydl_factory: YoutubeDLFactory | None = None

    def close(self) -> None:
        self.pool.close()

    def for_platform(self, platform: Platform) -> list[SubtitleProvider]:
        return [provider for provider in self.chain() if platform in provider.platforms]

    def chain(self) -> list[SubtitleProvider]:
        settings = self.settings
        keyless = _KeylessOptions(
            languages=settings.subtitle_languages,
            timeout=settings.subtitle_timeout,
            proxy_url=settings.subtitle_proxy_url,
        )
        providers: list[SubtitleProvider] = []
        for name in settings.subtitle_providers:
            if name == "bibigpt":
                key = settings.bibigpt_api_key
                if key is not None and key.get_secret_value():
                    providers.append(
                        BibiGPTProvider(
                            self.http,
                            settings.bibigpt_api_url,
                            key.get_secret_value(),
                            settings.bibigpt_timeout,
                        )
                    )
            elif name == "youtube":
                providers.append(
                    YouTubeTranscriptProvider(
                        self.pool, **keyless, session_factory=self.youtube_session_factory
                    )
                )
            elif name == "ytdlp":
                providers.append(
                    YtDlpProvider(
                        self.pool,
                        **keyless,
                        cookies_file=settings.ytdlp_cookies_file,
                        ydl_factory=self.ydl_factory,
                    )
                )
        return providers
