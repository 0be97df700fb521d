"""GraphiQL served from vendored assets: the page and its static files (CSP: security.py).

The assets in `static/graphiql/` are built by `scripts/build-graphiql` from pinned npm packages
and listed with their SHA-256 in `manifest.json`. They are served under a path that carries a
digest of the manifest (`/graphiql/static/<build>/<file>`), so every response can be cached
forever: new assets get a new path.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from mora_graphql.security import ide_csp

ASSETS_DIR = Path(__file__).parent / "static" / "graphiql"
STATIC_PREFIX = "/graphiql/static"
IMMUTABLE = "public, max-age=31536000, immutable"
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ttf": "font/ttf",
}


@dataclass(frozen=True)
class GraphiQLAssets:
    directory: Path
    build: str
    files: frozenset[str]

    @classmethod
    def load(cls, directory: Path = ASSETS_DIR) -> GraphiQLAssets:
        raw = (directory / "manifest.json").read_bytes()
        manifest = json.loads(raw)
        return cls(
            directory=directory,
            build=hashlib.sha256(raw).hexdigest()[:16],
            files=frozenset(manifest["files"]),
        )

    def url(self, name: str) -> str:
        return f"{STATIC_PREFIX}/{self.build}/{name}"

    def page(self, endpoint: str = "/graphql") -> str:
        return PAGE.format(
            css=html.escape(self.url("main.css")),
            js=html.escape(self.url("main.js")),
            endpoint=html.escape(endpoint),
        )

    async def serve(self, request: Request) -> Response:
        """One vendored file; anything not in the manifest of this build is a 404."""
        name = request.path_params["name"]
        if request.path_params["build"] != self.build or name not in self.files:
            return PlainTextResponse("Not Found", status_code=404)
        suffix = Path(name).suffix
        headers = {"cache-control": IMMUTABLE}
        if name.endswith(".worker.js"):
            # A worker runs under the policy delivered with its own script.
            headers["content-security-policy"] = ide_csp("")
        return FileResponse(
            self.directory / name,
            media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
            headers=headers,
        )


@cache
def graphiql_assets() -> GraphiQLAssets:
    return GraphiQLAssets.load()


def graphiql_routes() -> list[Route]:
    """The routes of the vendored files; the page itself is the GET of the GraphQL endpoint."""
    return [Route(STATIC_PREFIX + "/{build}/{name}", graphiql_assets().serve, methods=["GET"])]


PAGE = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>Mora GraphiQL</title>
    <link rel="icon" href="data:,">
    <link rel="stylesheet" href="{css}">
    <script type="module" src="{js}"></script>
  </head>
  <body>
    <div id="graphiql" data-endpoint="{endpoint}">Loading…</div>
  </body>
</html>
"""
