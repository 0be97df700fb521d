"""A fresh PostgreSQL database per multi-process test, named after TEST_DATABASE_URL."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import TEST_DATABASE_URL, unavailable


def fresh_database(suffix: str) -> str:
    """Drop and create `<test database>_<suffix>`; its asyncpg URL."""
    url = make_url(TEST_DATABASE_URL)
    url = url.set(database=f"{url.database}_{suffix}")
    admin_url = url.set(drivername="postgresql+psycopg", database="postgres")
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{url.database}"'))
        admin.dispose()
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable: {type(exc).__name__}: {exc}")
    return url.render_as_string(hide_password=False)
