"""Shared pytest setup: offline hubs; ``MEGACREDIT_TEST_ORDER=reverse`` runs the tests of each
module in reverse order (``make test-variant``, docs/testing.md); the ``needs`` mark of
tests/make_deps.py (a missing dependency skips, or fails under ``MEGACREDIT_REQUIRE_ALL=1``)."""
import os

from make_deps import check_needs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MEGACREDIT_TEST_ORDER") == "reverse":
        by_module: dict = {}
        for item in items:
            by_module.setdefault(item.module.__name__ if item.module else "", []).append(item)
        items[:] = [item for group in by_module.values() for item in reversed(group)]


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(name, present, detail): runs only with a dependency `make test` "
                                       "installs (tests/make_deps.py)")


def pytest_runtest_setup(item):
    check_needs(item)
