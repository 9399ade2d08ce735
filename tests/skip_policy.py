"""A pytest plugin: a test may skip only for a real optional condition, never for something missing.

A skip whose reason does not name one of ALLOWED_CONDITIONS (a GPU, a second host) turns the run into
a failure, wherever it came from: ``pytest.skip`` in a test or fixture, a ``skipif`` mark, a module-level
skip at collection, ``importorskip``, or an ``xfail``. A renamed module, a missing tool or fixture
therefore fails loudly instead of shrinking the suite. The summary prints the skip count and each skip
with its reason, so CI's log shows them.

tests/conftest.py loads it; tests/test_skip_policy.py checks it on a throwaway suite.
"""
from __future__ import annotations

import re

import pytest

# A skip reason must say which optional condition is absent, in these words.
ALLOWED_CONDITIONS = {
    "needs a GPU": re.compile(r"\bneeds (a |an )?(CUDA|GPU)\b", re.IGNORECASE),
    "needs a second host": re.compile(r"\bneeds a second host\b", re.IGNORECASE),
}


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail or 'no reason given'}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def is_allowed(reason: str) -> bool:
    return not reason.startswith("xfail:") and any(p.search(reason) for p in ALLOWED_CONDITIONS.values())


class SkipPolicy:
    def __init__(self):
        self.skips: list[tuple[str, str]] = []

    def _note(self, report):
        if report.skipped:
            self.skips.append((report.nodeid, _reason(report)))

    def pytest_runtest_logreport(self, report):
        self._note(report)

    def pytest_collectreport(self, report):
        self._note(report)

    @property
    def refused(self) -> list[tuple[str, str]]:
        return [(node, reason) for node, reason in self.skips if not is_allowed(reason)]

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session):
        if self.refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        refused = self.refused
        allowed = len(self.skips) - len(refused)
        terminalreporter.write_sep("-", "skip policy")
        terminalreporter.write_line(f"skipped: {len(self.skips)} ({allowed} for an allowed reason: "
                                    f"{', '.join(ALLOWED_CONDITIONS)}; {len(refused)} refused)")
        for node, reason in self.skips:
            mark = "allowed" if is_allowed(reason) else "REFUSED"
            terminalreporter.write_line(f"  {mark} {node}: {reason}")
        if refused:
            terminalreporter.write_line(
                "A skip must name a real optional condition in its reason (e.g. 'needs a GPU'); anything "
                "missing (a module, a fixture, a tool) must fail instead. The run counts as failed.", red=True)


def pytest_configure(config):
    config.pluginmanager.register(SkipPolicy(), "comfy-turbo-skip-policy")
