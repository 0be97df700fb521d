"""GraphiQL in a real headless Chromium against the real server, with every other host blocked.

Runs with Debian's Chromium (`/usr/bin/chromium`, or `MORA_CHROMIUM`), driven by Playwright;
Playwright's own browser download is never used. Without Chromium it skips, except under
`CI=true`. Set `MORA_GRAPHIQL_SCREENSHOT=docs/graphiql.png` to save the final page.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, LiveServer
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CODE = """import csv


def load_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def average(rows, column):
    values = [float(row[column]) for row in rows]
    return sum(values) / len(values)


def main():
    rows = load_rows("data.csv")
    print(len(rows), "rows")
    print("average price:", average(rows, "price"))


if __name__ == "__main__":
    main()
"""
SRT = "1\n00:00:01,000 --> 00:00:09,000\nwe count the rows of a csv file\n"
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 9, "description": "Count", "startLine": 1, "endLine": 22}
    ]
}
QUERY_EDITOR = ".graphiql-query-editor .monaco-editor"
HEADERS_EDITOR = '.monaco-editor[data-uri$="request-headers.json"]'
SUBSCRIPTION = (
    'subscription { sessionProgress(sessionId: "{id}") { __typename seq status progress '
    "... on CodeDelta { text } ... on SessionCompleted { session { status generatedCode } } } }"
)


def chromium_path() -> str:
    path = os.environ.get("MORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        reason = f"Chromium not found at {path} (apt-get install chromium, or set MORA_CHROMIUM)"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true: the browser test must run")
        pytest.skip(reason)
    return path


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "graphiql": True,
    }


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = chromium_path()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield instance
        finally:
            await instance.close()


def chunks(text: str, size: int = 12) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def editor_text(page: Any, selector: str) -> str:
    """What Monaco shows in an editor (its lines render with non-breaking spaces)."""
    return str(await page.locator(f"{selector} .view-lines").inner_text()).replace("\xa0", " ")


async def replace_editor_text(page: Any, editor: str, text: str) -> None:
    await page.locator(editor).click()
    await page.keyboard.press("Control+A")
    await page.keyboard.press("Delete")
    await page.keyboard.insert_text(text)


async def run(page: Any) -> None:
    await page.locator(".graphiql-execute-button").click()


async def wait_for_response(page: Any, needle: str, limit: float = 15) -> str:
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        text = await editor_text(page, ".graphiql-response")
        if needle in text:
            return text
        assert asyncio.get_running_loop().time() < deadline, text
        await asyncio.sleep(0.05)


async def test_graphiql_offline_query_headers_and_subscription(
    live: LiveServer, openai_server: FakeOpenAI, browser: Any
) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 860})
    page = await context.new_page()
    foreign: list[str] = []
    problems: list[str] = []
    sockets: list[str] = []

    async def only_this_server(route: Any) -> None:
        foreign.append(route.request.url)
        await route.abort()

    await context.route(lambda url: not url.startswith(live.url + "/"), only_this_server)
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: message.type == "error" and problems.append(f"console: {message.text}"),
    )

    page_response = await page.goto(f"{live.url}/graphql")
    assert page_response is not None and page_response.status == 200
    assert "https:" not in page_response.headers["content-security-policy"]
    await page.locator(QUERY_EDITOR).wait_for(timeout=20_000)

    # A query over HTTP, typed into the editor.
    await replace_editor_text(page, QUERY_EDITOR, "{ __typename }")
    await run(page)
    await wait_for_response(page, '"__typename": "Query"')

    # The headers editor: a bearer token, used by HTTP requests and persisted.
    token = await live.register("graphiql@example.com")
    await page.get_by_text("Headers", exact=True).click()
    await replace_editor_text(
        page, HEADERS_EDITOR, json.dumps({"Authorization": f"Bearer {token}"})
    )
    await replace_editor_text(page, QUERY_EDITOR, "{ me { email } }")
    await run(page)
    await wait_for_response(page, '"email": "graphiql@example.com"')
    # GraphiQL writes its storage after a debounce: wait for it rather than read it once.
    persisted = await page.wait_for_function(
        "token => JSON.stringify(Object.assign({}, localStorage)).includes(token)",
        arg=token,
        timeout=10_000,
    )
    assert await persisted.json_value(), "shouldPersistHeaders keeps the headers in localStorage"

    # A subscription over graphql-transport-ws, authenticated by the same header.
    openai_server.enqueue(
        Stream(content_chunks=chunks(CODE, 8), chunk_delay=0.1), JSON(json.dumps(TIMELINE))
    )
    created = await live.gql(
        'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ",'
        " subtitles: $s}) { id } }",
        {"s": SRT},
        token,
    )
    session_id = created["data"]["createSession"]["id"]
    await replace_editor_text(page, QUERY_EDITOR, SUBSCRIPTION.replace("{id}", session_id))
    await page.get_by_label(re.compile("^Prettify")).first.click()
    await page.locator(f"{QUERY_EDITOR} .view-lines", has_text="sessionProgress(").wait_for()
    # GraphiQL re-parses the document after a debounce; run only once it knows the operation
    # is a subscription (else it would send it as a plain HTTP request).
    await page.wait_for_timeout(1_500)
    await run(page)
    seen: dict[int, str] = {}
    deadline = asyncio.get_running_loop().time() + 30
    while "SessionCompleted" not in seen.values():
        text = await editor_text(page, ".graphiql-response")
        for typename, seq in re.findall(r'"__typename": "(\w+)",\s*"seq": (\d+)', text):
            seen[int(seq)] = typename
        assert asyncio.get_running_loop().time() < deadline, (seen, text)
        await asyncio.sleep(0.05)
    final = await wait_for_response(page, '"status": "COMPLETED"')
    assert "average price" in final
    assert list(seen.values()).count("CodeDelta") >= 3, seen
    assert sorted(seen) == list(seen), "events are shown in seq order"

    if target := os.environ.get("MORA_GRAPHIQL_SCREENSHOT"):
        for editor in (HEADERS_EDITOR, QUERY_EDITOR):  # scrolled back to the start
            await page.locator(editor).click()
            await page.keyboard.press("Control+Home")
        await page.screenshot(path=target)
    await context.close()

    assert foreign == [], f"requests to other hosts: {foreign}"
    ws_url = live.ws_url
    assert sockets and all(url == ws_url for url in sockets), sockets
    assert problems == [], problems
