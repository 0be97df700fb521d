"""The vendored GraphiQL assets: pinned, integrity-checked, served immutable from this origin."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from mora_graphql.graphiql import ASSETS_DIR, GraphiQLAssets, graphiql_assets
from mora_graphql.security import ide_csp
from tests.conftest import LiveServer

NPM_DIR = Path(__file__).resolve().parents[2] / "scripts" / "graphiql"
BUNDLED = {"graphiql", "@graphiql/plugin-explorer", "@graphiql/toolkit", "graphql-ws", "react"}


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(getattr(request, "param", {}))


def manifest() -> dict[str, Any]:
    return json.loads((ASSETS_DIR / "manifest.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def test_committed_assets_match_the_manifest() -> None:
    files = manifest()["files"]
    on_disk = {path.name for path in ASSETS_DIR.iterdir()} - {"manifest.json"}
    assert on_disk == set(files)
    assert {"main.js", "main.css", "editor.worker.js", "json.worker.js", "graphql.worker.js"} <= (
        on_disk
    )
    for name, entry in files.items():
        data = (ASSETS_DIR / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} differs from manifest"


def test_assets_come_from_the_pinned_integrity_checked_packages() -> None:
    package = json.loads((NPM_DIR / "package.json").read_text())
    lock = json.loads((NPM_DIR / "package-lock.json").read_text())
    for name, version in {**package["dependencies"], **package["devDependencies"]}.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} is not pinned: {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    for path, entry in lock["packages"].items():
        if path:
            assert entry["integrity"].startswith("sha512-"), path
            resolved = entry.get("resolved", "https://registry.npmjs.org/")  # other platforms
            assert resolved.startswith("https://registry.npmjs.org/"), path
    recorded = manifest()["packages"]
    assert set(recorded) >= BUNDLED
    for name, entry in recorded.items():
        locked = lock["packages"][f"node_modules/{name}"]
        assert entry == {"version": locked["version"], "integrity": locked["integrity"]}, name


def test_build_id_follows_the_manifest(tmp_path: Path) -> None:
    assets = graphiql_assets()
    copy = tmp_path / "graphiql"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps({**manifest(), "generator": "changed"}))
    changed = GraphiQLAssets.load(copy)
    assert re.fullmatch(r"[0-9a-f]{16}", assets.build)
    assert changed.build != assets.build
    assert changed.files == assets.files


def test_ide_policy_hashes_inline_scripts_and_names_no_other_origin() -> None:
    policy = ide_csp("<script>boot()</script><script src='/x.js'></script>")
    digest = base64.b64encode(hashlib.sha256(b"boot()").digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    assert policy.count("'sha256-") == 1
    assert not re.search(r"https?:|wss?:|\*", policy), policy


async def test_assets_are_served_immutable_with_their_manifest_hashes(live: LiveServer) -> None:
    page = await live.http.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    build = graphiql_assets().build
    linked = re.findall(r'(?:src|href)="(/graphiql/[^"]+)"', page.text)
    assert sorted(linked) == [
        f"/graphiql/static/{build}/main.css",
        f"/graphiql/static/{build}/main.js",
    ]
    for name, entry in manifest()["files"].items():
        response = await live.http.get(f"/graphiql/static/{build}/{name}")
        assert response.status_code == 200, name
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert hashlib.sha256(response.content).hexdigest() == entry["sha256"], name
        if name.endswith(".js"):
            assert response.headers["content-type"] == "text/javascript; charset=utf-8"
        if name.endswith(".worker.js"):
            assert response.headers["content-security-policy"] == ide_csp("")
    assert (
        (await live.http.get(f"/graphiql/static/{build}/main.css"))
        .headers["content-type"]
        .startswith("text/css")
    )


@pytest.mark.parametrize(
    "path",
    [
        "/graphiql/static/0123456789abcdef/main.js",
        "/graphiql/static/{build}/missing.js",
        "/graphiql/static/{build}/manifest.json",
        "/graphiql/static/{build}/..%2F..%2Fgraphiql.py",
        "/graphiql/static/{build}/%2E%2E/graphiql.py",
    ],
)
async def test_only_listed_files_of_this_build_are_served(live: LiveServer, path: str) -> None:
    response = await live.http.get(path.format(build=graphiql_assets().build))
    assert response.status_code == 404
    assert "immutable" not in response.headers.get("cache-control", "")


@pytest.mark.parametrize("settings_overrides", [{"environment": "production"}], indirect=True)
async def test_no_assets_when_graphiql_is_off(live: LiveServer) -> None:
    response = await live.http.get(f"/graphiql/static/{graphiql_assets().build}/main.js")
    assert response.status_code == 404
