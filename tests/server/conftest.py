"""Real `tokenmill serve` processes, started once per module and talked to over real HTTP."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from serverproc import Server, start_server, stop, wait_healthy


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """The plain server: no API key, no queue limit."""
    srv = start_server(tmp_path_factory.mktemp("serve"))
    try:
        wait_healthy(srv)
        yield srv
    finally:
        stop(srv)
