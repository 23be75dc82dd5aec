"""A pytest plugin: a test may skip only for a missing GPU (marker `gpu`) or a missing system browser; any other skip fails the session.

A skip that hides a missing file or package turns a failing suite green on a clone that lacks it; this makes it red.
It reads the reports where pytest (or, under pytest-xdist, the controlling process) collects them, so it holds with `-n N` too."""
import pytest

ALLOWED = ('no chromium', 'playwright is not installed')  # a missing browser: `make test` installs one where it can
BAD = []  # the skips not allowed, as 'nodeid: reason'


def allowed(report) -> bool:
    "Whether a skip is one the project accepts: a gpu-marked test, or one that says the browser is missing."
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr).lower()
    return 'gpu' in report.keywords or any(a in reason for a in ALLOWED)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, 'wasxfail') and not allowed(report):  # an xfail is reported as a skip
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        BAD.append(f'{report.nodeid}: {reason}')


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, 'workerinput'): return  # an xdist worker: its controller reads the reports and decides
    if BAD:
        tr = session.config.pluginmanager.get_plugin('terminalreporter')
        for b in BAD: tr.write_line(f'SKIP NOT ALLOWED (only a missing GPU or browser may skip a test): {b}', red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
