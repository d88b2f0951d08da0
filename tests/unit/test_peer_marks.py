"""A test that needs a real peer which is not installed is skipped, and fails under CI=true."""

from __future__ import annotations

import pytest

from tests import peers

pytest_plugins = ["pytester"]

_CONFTEST = """
from tests.conftest import pytest_runtest_setup  # noqa: F401
from tests import peers
peers.PEERS["absent-tool"] = ("a tool nobody installed", lambda: False)
peers.PEERS["present-tool"] = ("a tool that is there", lambda: True)

def pytest_configure(config):
    config.addinivalue_line("markers", "peer(names...): real peers")
"""

_TESTS = """
import pytest

@pytest.mark.peer("absent-tool")
def test_needs_the_absent_tool():
    pass

@pytest.mark.peer("present-tool")
def test_needs_the_present_tool():
    pass
"""


@pytest.mark.parametrize(("ci", "outcomes"), [("", {"passed": 1, "skipped": 1}), ("true", {"passed": 1, "errors": 1})])
def test_a_missing_peer_skips_or_fails_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                 ci: str, outcomes: dict[str, int]) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(**outcomes)
    text = result.stdout.str()
    assert "a tool nobody installed not installed" in text
    if ci:
        assert "CI=true and a required peer is missing" in text


def test_unknown_peer_names_are_an_error() -> None:
    with pytest.raises(ValueError, match="unknown peers"):
        peers.missing_peers(["no-such-peer"])
