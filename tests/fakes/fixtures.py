"""Plain pytest fixtures for the fake servers.

Import them into a test module, preferably by their `*_fixture` alias so ruff does not
flag the test parameters as redefinitions (F811); pytest registers them under the
short name either way:

    from tests.fakes.fixtures import openai_server_fixture  # noqa: F401

    async def test_x(openai_server: FakeOpenAI) -> None: ...

Each server is started once per test session (stopping uvicorn costs ~0.2s) and reset
before every test, so scripts and recorded requests never leak between tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import pytest

from tests.fakes.bibigpt_server import FakeBibiGPT
from tests.fakes.openai_server import FakeOpenAI

OPENAI_TEST_KEY = "sk-test-deepseek-key-9f8e7d6c5b4a"


class _Fake(Protocol):
    def stop(self) -> None: ...

    def reset(self) -> None: ...


F = TypeVar("F", bound=_Fake)
_running: dict[str, _Fake] = {}


def _shared(request: pytest.FixtureRequest, key: str, start: Callable[[], F]) -> F:
    server = _running.get(key)
    if server is None:
        server = start()
        _running[key] = server

        def stop() -> None:
            _running.pop(key, None)
            server.stop()

        request.session.addfinalizer(stop)
    server.reset()
    return server  # type: ignore[return-value]


@pytest.fixture(name="openai_server")
def openai_server_fixture(request: pytest.FixtureRequest) -> Iterator[FakeOpenAI]:
    """A running fake that requires `Authorization: Bearer OPENAI_TEST_KEY`."""
    server = _shared(request, "openai", lambda: FakeOpenAI(api_key=OPENAI_TEST_KEY).start())
    yield server
    server.reset()


@pytest.fixture(name="bibigpt_server")
def bibigpt_server_fixture(request: pytest.FixtureRequest) -> Iterator[FakeBibiGPT]:
    server = _shared(request, "bibigpt", lambda: FakeBibiGPT().start())
    yield server
    server.reset()


openai_server = openai_server_fixture
bibigpt_server = bibigpt_server_fixture
