"""The reliability suite's summary line: passed cases counted by kind (faults survived, bad inputs refused,
fuzz examples tried, guarantees held), printed at the end of the run and quoted in docs/reliability.md."""

from __future__ import annotations

import collections

import pytest
import reliability_support as support

# passed / failed cases by kind, tests by kind, and fuzz examples by outcome, for this session
TALLY = {"passed": collections.Counter(), "failed": collections.Counter(), "tests": collections.Counter(),
         "outcomes": collections.Counter(), "skipped": collections.Counter(), "xfailed": collections.Counter()}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process trainings use one torch thread, like the CLI runs (--threads 1): on a busy shared machine more
    threads than free cores make torch's OpenMP workers spin and a 1-second training take a minute."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kind(item: pytest.Item) -> str | None:
    """The kind given by the closest @pytest.mark.reliability(kind=...) of a test."""
    for marker in item.iter_markers("reliability"):
        if "kind" in marker.kwargs:
            return marker.kwargs["kind"]
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of this folder must say what kind of case it is."""
    for item in items:
        if item.path.parent.name == "reliability" and item.get_closest_marker("reliability"):
            kind = _kind(item)
            if kind not in support.KINDS:
                raise pytest.UsageError(f"{item.nodeid}: mark it @pytest.mark.reliability(kind=...) with one of "
                                        f"{', '.join(support.KINDS)} (got {kind!r})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Attach the kind and the test's own counts to its report (user_properties travel with the report)."""
    outcome = yield
    report = outcome.get_result()
    kind = _kind(item)
    if kind is None or report.when != "call":
        return
    node = item.nodeid
    report.user_properties.append(("reliability_kind", kind))
    report.user_properties.append(("reliability_cases", support.CASES.pop(node, 0)))
    report.user_properties.append(("reliability_outcomes", dict(support.OUTCOMES.pop(node, {}))))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add a finished test's cases to the tally: a passed fuzz test counts its examples, others their cases."""
    props = dict(report.user_properties)
    if report.when != "call" or "reliability_kind" not in props:
        return
    kind = props["reliability_kind"]
    TALLY["tests"][kind] += 1
    if hasattr(report, "wasxfail"):
        TALLY["xfailed"][kind] += 1
    elif report.skipped:
        TALLY["skipped"][kind] += 1
    elif report.failed:
        TALLY["failed"][kind] += 1
    elif kind == "fuzz":
        TALLY["passed"][kind] += sum(props["reliability_outcomes"].values())
        TALLY["outcomes"].update(props["reliability_outcomes"])
    else:
        TALLY["passed"][kind] += props["reliability_cases"] or 1


def summary_line(tally: dict) -> str:
    """'reliability: N faults survived, N bad inputs refused, N fuzz examples tried (...), N guarantees held'."""
    passed, outcomes = tally["passed"], tally["outcomes"]
    parts = []
    for kind, words in support.KINDS.items():
        text = f"{passed[kind]} {words}"
        if kind == "fuzz" and outcomes:
            text += " (" + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())) + ")"
        parts.append(text)
    extra = [f"{sum(tally[what].values())} {what.upper() if what == 'failed' else what}"
             for what in ("failed", "skipped", "xfailed") if sum(tally[what].values())]
    tests = f"{sum(tally['tests'].values())} tests"
    return f"reliability: {', '.join(parts)} ({', '.join([tests, *extra])})"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if sum(TALLY["tests"].values()):
        terminalreporter.write_sep("=", "reliability catalogue")
        terminalreporter.write_line(summary_line(TALLY))
