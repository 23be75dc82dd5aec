"""A pytest plugin: a test may skip only for a missing GPU (marker `gpu`) or a missing system browser; any other skip fails the session.

A skip that hides a missing file or package turns a failing suite green on a clone that lacks it; this makes it red."""
import pytest

ALLOWED = ('no chromium', 'playwright is not installed')  # a missing browser: `make test` installs one where it can


def allowed(report, item) -> bool:
    "Whether a skip is one the project accepts: a gpu-marked test, or one that says the browser is missing."
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr).lower()
    return item.get_closest_marker('gpu') is not None or any(a in reason for a in ALLOWED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, 'wasxfail') and not allowed(rep, item):  # an xfail is reported as a skip
        item.config._bad_skips = getattr(item.config, '_bad_skips', []) + [f'{item.nodeid}: {rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else rep.longrepr}']


def pytest_sessionfinish(session, exitstatus):
    if bad := getattr(session.config, '_bad_skips', []):
        tr = session.config.pluginmanager.get_plugin('terminalreporter')
        for b in bad: tr.write_line(f'SKIP NOT ALLOWED (only a missing GPU or browser may skip a test): {b}', red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
