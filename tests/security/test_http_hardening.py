"""Security headers, CORS and WebSocket origins, registration switch, admin bootstrap,
and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import sys
from typing import Any

import pytest
import structlog
from websockets.exceptions import InvalidStatus

from mora_graphql.logging import configure_logging, register_secrets, settings_secrets
from tests.conftest import SECRET, LiveServer, make_settings
from tests.security.conftest import PASSWORD, codes, init, raw_socket, sign_in
from tests.wsclient import TRANSPORT_WS

ALLOWED = "https://app.example.com"
REGISTER = (
    "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken } }"
)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"cors_origins": ALLOWED, **getattr(request, "param", {})}


async def check_security_headers_on_api_responses(live: LiveServer) -> None:
    for response in (
        await live.http.get("/health"),
        await live.http.post("/graphql", json={"query": "{ __typename }"}),
        await live.http.post(
            "/graphql", content=b"not json", headers={"content-type": "application/json"}
        ),
    ):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "strict-transport-security" not in headers


async def check_graphiql_csp_allows_exactly_its_own_scripts(live: LiveServer) -> None:
    page = await live.http.get("/graphql", headers={"Accept": "text/html"})
    policy = page.headers["content-security-policy"]
    directives = {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'"]
    assert directives["worker-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    # No third-party origin anywhere: only keywords and data: for fonts and images.
    for sources in directives.values():
        for source in sources:
            assert source.startswith("'") or source == "data:", (source, policy)
    assert not re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text), "no inline script"
    for url in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert url.startswith("/graphiql/static/") or url == "data:,", url


async def check_cors_and_websocket_origins(live: LiveServer) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    good = await live.http.options("/graphql", headers={"Origin": ALLOWED, **preflight})
    assert good.headers["access-control-allow-origin"] == ALLOWED
    assert good.headers["x-content-type-options"] == "nosniff"
    bad = await live.http.options(
        "/graphql", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in bad.headers
    simple = await live.http.post(
        "/graphql", json={"query": "{ __typename }"}, headers={"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in simple.headers

    ws = await raw_socket(live, TRANSPORT_WS, origin=ALLOWED)
    assert (await init(ws))["type"] == "connection_ack"
    await ws.close()
    with pytest.raises(InvalidStatus) as refused:
        await raw_socket(live, TRANSPORT_WS, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    no_origin = await raw_socket(live, TRANSPORT_WS)
    assert (await init(no_origin))["type"] == "connection_ack"
    await no_origin.close()


@pytest.mark.parametrize("settings_overrides", [{"registration_enabled": False}], indirect=True)
async def test_registration_switch_and_admin_bootstrap(live: LiveServer, sqlite_url: str) -> None:
    refused = await live.gql(REGISTER, {"e": "new@example.com", "p": PASSWORD})
    assert codes(refused) == ["FORBIDDEN"]

    env = {
        **os.environ,
        "DATABASE_URL": sqlite_url,
        "SECRET_KEY": SECRET,
        "ENVIRONMENT": "test",
        "MORA_USER_PASSWORD": PASSWORD,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mora_graphql.cli",
        "user",
        "create",
        "root@example.com",
        "--admin",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert b"created admin root@example.com" in out
    login = await sign_in(live, "root@example.com")
    assert login["data"]["login"]["user"]["role"] == "ADMIN"


def test_secrets_never_reach_the_logs(capfd: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(name) for name in ("sqlalchemy.pool", "uvicorn.access")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    settings = make_settings(
        "postgresql+asyncpg://mora:db-pa%24%24word-42@db.internal:5432/mora",
        deepseek_api_key="sk-deepseek-0123456789abcdef",
        bibigpt_api_key="bibi-key-0123456789",
        redis_url="redis://:redis-secret-99@cache:6379/0",
    )
    configure_logging("INFO")
    register_secrets(settings_secrets(settings))
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    secrets = [
        "db-pa$$word-42",
        "db-pa%24%24word-42",
        "sk-deepseek-0123456789abcdef",
        "bibi-key-0123456789",
        "redis-secret-99",
        SECRET,
        jwt_like,
        "mrt_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "hunter2-password",
    ]
    upstream = ConnectionError(
        "could not connect to postgresql+asyncpg://mora:db-pa%24%24word-42@db.internal/mora "
        "using password db-pa$$word-42 (api key sk-deepseek-0123456789abcdef)"
    )
    try:
        raise RuntimeError("provider said: invalid key bibi-key-0123456789") from upstream
    except RuntimeError:
        logging.getLogger("sqlalchemy.pool").exception("checkout failed for %s", "redis-secret-99")
        structlog.get_logger("mora.test").error(
            "request failed",
            headers={"Authorization": f"Bearer {jwt_like}"},
            body='{"password": "hunter2-password", "refreshToken": "mrt_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"}',
            secret_key=SECRET,
            exc_info=True,
        )
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/graphql?token={jwt_like}", "1.1", 200
    )
    for logger in loggers:
        logger.removeHandler(handler)
    output = capfd.readouterr().err + stream.getvalue()
    assert "checkout failed" in output and "request failed" in output and "GET /graphql" in output
    assert "[REDACTED]" in output
    leaked = [secret for secret in secrets if secret in output]
    assert not leaked, output


async def test_headers_csp_cors_and_origins(live: LiveServer) -> None:
    await check_security_headers_on_api_responses(live)
    await check_graphiql_csp_allows_exactly_its_own_scripts(live)
    await check_cors_and_websocket_origins(live)
