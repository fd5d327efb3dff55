import pytest

from tests.reliability.common import Tally, Workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Tiny inputs for every writing command (one set per test process)."""
    return Workspace(str(tmp_path_factory.mktemp("reliability-inputs")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.reliability_failed = report.failed


@pytest.fixture
def tally(request):
    """Counts one test's cases by outcome; the soak log gets them (and whether the test failed)."""
    counter = Tally(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"), request.node.name)
    yield counter
    counter.failed = getattr(request.node, "reliability_failed", False)
    counter.write()
