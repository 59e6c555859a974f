"""Run again only what a crashed pass left unfinished (`--skip-finished`).

A native crash (segfault, abort) kills a pytest-xdist worker. With
`--max-worker-restart=0` (needed: pytest-xdist 3.8 can hang for good when it
replaces a crashed worker under `--dist loadfile`), the dead worker's
remaining tests are dropped without being reported. pytest's own
`--last-failed` would then run the crashed test alone and leave those out.

So every pass records which tests finished (passed or skipped, nothing
failed in setup, call or teardown) in pytest's cache, one list per backend
and marker expression. `pytest --skip-finished` deselects those and runs
everything else: the crashed test, the failed ones and the ones never run.
Written here because the tools at hand rerun failed tests (pytest's
`--last-failed`, pytest-rerunfailures), and the tests a crashed worker never
reached did not fail: they are simply missing from the run.
"""

from __future__ import annotations

import re

import pytest

OPTION = "--skip-finished"


def _cache_key(config: pytest.Config) -> str:
    import keras

    marks = re.sub(r"[^A-Za-z0-9_]+", "_", config.option.markexpr or "all")
    return f"keras_aim/finished/{keras.config.backend()}/{marks}"


def add_option(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION, action="store_true", default=False,
        help="run only the tests that did not pass or skip in the last run of "
        "this pass (same backend and -m): after a test worker crashed",
    )


class FinishedTests:
    """Collects the finished tests of a run; on the controlling process only
    (pytest-xdist workers report to it), it writes them to the cache."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.ok: set[str] = set()
        self.failed: set[str] = set()

    def previously_finished(self) -> set[str]:
        return set(self.config.cache.get(_cache_key(self.config), []))

    def pytest_collection_modifyitems(self, config, items) -> None:
        if not config.getoption(OPTION):
            return
        finished = self.previously_finished()
        keep = [item for item in items if item.nodeid not in finished]
        dropped = [item for item in items if item.nodeid in finished]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failed.add(report.nodeid)
        elif report.skipped or (report.when == "call" and report.passed):
            self.ok.add(report.nodeid)

    def pytest_sessionfinish(self, session) -> None:
        if hasattr(self.config, "workerinput"):  # a pytest-xdist worker
            return
        finished = self.ok - self.failed
        if self.config.getoption(OPTION):
            finished |= self.previously_finished() - self.failed
        self.config.cache.set(_cache_key(self.config), sorted(finished))


def register(config: pytest.Config) -> None:
    """Installs the plugin (a conftest's `pytest_configure`); without
    pytest's cache (`-p no:cacheprovider`) there is nothing to record in."""
    if config.pluginmanager.has_plugin("cacheprovider"):
        config.pluginmanager.register(FinishedTests(config), "keras_aim_finished_tests")
