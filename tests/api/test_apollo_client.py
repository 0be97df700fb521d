"""Apollo Client's persisted-query link (the npm package itself, through node) against Mora.

Needs node and `npm ci` in tests/clients/apollo; skipped (failed under CI) otherwise.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import LiveServer, unavailable

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "apollo"


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_apollo_persisted_query_link(live: LiveServer, method: str) -> None:
    node = shutil.which("node")
    if node is None or not (CLIENT / "node_modules" / "@apollo" / "client").exists():
        unavailable("node and `npm ci` in tests/clients/apollo are needed")
    token = await live.register(f"apollo-{method.lower()}@example.com")
    process = await asyncio.create_subprocess_exec(
        str(node),
        "check.mjs",
        f"{live.url}/graphql",
        token,
        method,
        cwd=CLIENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    expected = {
        "me": {
            "__typename": "User",
            "email": f"apollo-{method.lower()}@example.com",
            "role": "USER",
        }
    }
    assert [result["data"] for result in report["results"]] == [expected, expected]
    assert all(result["error"] is None for result in report["results"])
    # First the hash alone (not found), then hash and document (POST), then the hash alone.
    assert report["sent"] == [
        {"method": method, "hasQuery": False},
        {"method": "POST", "hasQuery": True},
        {"method": method, "hasQuery": False},
    ]
