"""Run the npm subscription clients in tests/js (`npm ci` there) against a live server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

JS = Path(__file__).resolve().parent / "js"
JS_CLIENTS = ("apollo", "sse")


async def js_subscribe(
    client: str, url: str, token: str | None, query: str, variables: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every line the client printed: results, then `complete` or `error`."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@apollo" / "client").is_dir():
        pytest.skip("the npm subscription clients need node and `npm ci` in tests/js")
    process = await asyncio.create_subprocess_exec(
        node,
        str(JS / "subscribe.mjs"),
        client,
        url,
        token or "",
        query,
        json.dumps(variables),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]
