from pathlib import Path

from mora_graphql.graphql.schema import build_schema
from tests.conftest import make_settings


def test_committed_schema_matches_code(repo_root: Path) -> None:
    committed = (repo_root / "schema.graphql").read_text(encoding="utf-8")
    generated = build_schema(make_settings("sqlite+aiosqlite://")).as_str() + "\n"
    assert committed == generated, (
        "schema.graphql is stale: run `mora export-schema -o schema.graphql`"
    )
