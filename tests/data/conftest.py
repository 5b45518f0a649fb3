import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs the network; runs only with IDML_TEST_NETWORK=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("IDML_TEST_NETWORK") == "1":
        return
    skip = pytest.mark.skip(reason="network test; set IDML_TEST_NETWORK=1 to run it")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)
