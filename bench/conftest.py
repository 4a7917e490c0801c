"""Without the pytest-benchmark plugin (not installed, or `-p no:benchmark`) the suite is skipped
with the reason, instead of failing on a missing `benchmark` fixture."""

import pytest


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        config.addinivalue_line("markers", "benchmark: pytest-benchmark options (the plugin is absent)")


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed or disabled (pip install pytest-benchmark)")
    for item in items:  # the session's items: only this folder's tests need the plugin
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
