"""Error codes and the exception hierarchy shared by every layer."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(Enum):
    """Symbolic code plus the numeric code clients already know."""

    INVALID_VIDEO_URL = 1001
    VIDEO_TOO_LONG = 1002
    UNSUPPORTED_PLATFORM = 1003
    BIBIGPT_API_ERROR = 2001
    NO_SUBTITLE = 2002
    DEEPSEEK_API_ERROR = 2003
    UPSTREAM_BLOCKED = 2004
    AI_GENERATION_FAILED = 3001
    DATABASE_ERROR = 3002
    CACHE_ERROR = 3003
    BAD_USER_INPUT = 4000
    BAD_REQUEST = 4002
    UNAUTHENTICATED = 4001
    FORBIDDEN = 4003
    NOT_FOUND = 4004
    CONFLICT = 4009
    RATE_LIMITED = 4029
    INTERNAL_ERROR = 5001

    @property
    def numeric(self) -> int:
        return self.value


MESSAGES: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.INVALID_VIDEO_URL: (
        "The video URL is not valid. Use a YouTube, Bilibili or TikTok/Douyin link.",
        "视频URL不支持，请使用YouTube/Bilibili/TikTok链接",
    ),
    ErrorCode.VIDEO_TOO_LONG: ("The video is longer than the allowed maximum.", "视频时长超过上限"),
    ErrorCode.UNSUPPORTED_PLATFORM: ("This video platform is not supported.", "不支持的视频平台"),
    ErrorCode.BIBIGPT_API_ERROR: (
        "Fetching subtitles failed, please try again later.",
        "字幕提取失败，请稍后重试",
    ),
    ErrorCode.NO_SUBTITLE: ("This video has no usable subtitles.", "该视频没有可用字幕"),
    ErrorCode.DEEPSEEK_API_ERROR: ("Code generation failed, please retry.", "代码生成失败，请重试"),
    ErrorCode.UPSTREAM_BLOCKED: (
        "Every subtitle source refused the request.",
        "所有字幕来源都拒绝了请求",
    ),
    ErrorCode.AI_GENERATION_FAILED: ("The AI could not produce a result.", "AI生成失败"),
    ErrorCode.DATABASE_ERROR: ("A database operation failed.", "数据库操作失败"),
    ErrorCode.CACHE_ERROR: ("A cache operation failed.", "缓存操作失败"),
    ErrorCode.BAD_USER_INPUT: ("The input is not valid.", "输入无效"),
    ErrorCode.BAD_REQUEST: ("The request cannot be served as sent.", "请求无法按原样处理"),
    ErrorCode.UNAUTHENTICATED: ("Authentication is required.", "需要登录"),
    ErrorCode.FORBIDDEN: ("You are not allowed to do this.", "没有权限"),
    ErrorCode.NOT_FOUND: ("Not found.", "未找到"),
    ErrorCode.CONFLICT: ("The request conflicts with the current state.", "请求与当前状态冲突"),
    ErrorCode.RATE_LIMITED: ("Too many requests, slow down.", "请求过于频繁"),
    ErrorCode.INTERNAL_ERROR: ("Internal server error.", "服务器内部错误"),
}


def default_message(code: ErrorCode, lang: str = "en") -> str:
    en, zh = MESSAGES[code]
    return zh if lang.startswith("zh") else en


class MoraError(Exception):
    """An expected error: its message is safe to show to the client."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str | None = None,
        *,
        code: ErrorCode | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message or default_message(self.code)
        self.extra = extensions or {}
        super().__init__(self.message)

    @property
    def extensions(self) -> dict[str, Any]:
        return {"code": self.code.name, "numericCode": self.code.numeric, **self.extra}


class BadUserInput(MoraError):
    code = ErrorCode.BAD_USER_INPUT


class BadRequest(MoraError):
    """The request as a whole is unusable (not one argument): wrong transport, bad text."""

    code = ErrorCode.BAD_REQUEST


class InvalidVideoUrl(MoraError):
    code = ErrorCode.INVALID_VIDEO_URL


class UnsupportedPlatform(MoraError):
    code = ErrorCode.UNSUPPORTED_PLATFORM


class Unauthenticated(MoraError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(MoraError):
    code = ErrorCode.FORBIDDEN


class NotFound(MoraError):
    code = ErrorCode.NOT_FOUND


class Conflict(MoraError):
    code = ErrorCode.CONFLICT


class DatabaseUnavailable(MoraError):
    """The database could not be reached (or the connection was lost) for this request."""

    code = ErrorCode.DATABASE_ERROR


class RateLimited(MoraError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message, extensions={"retryAfter": retry_after})
        self.retry_after = retry_after


class PipelineError(MoraError):
    """Ends a session in ERROR. `retryable` errors may be retried by the job runner."""

    def __init__(
        self, code: ErrorCode, message: str | None = None, *, retryable: bool = False
    ) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable
