"""Metrics lines are valid CloudWatch Embedded Metric Format documents.

The structure checked is the EMF specification's: a root `_aws` object with an
integer millisecond Timestamp and CloudWatchMetrics directives, each naming a
Namespace, dimension sets (arrays of names, each a top-level string member)
and metric definitions (Name and a CloudWatch Unit, each a top-level number).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from functions import jobs, metrics
from functions.health import handler
from tests import db
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

CLOUDWATCH_UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second", "Gigabits/Second",
    "Terabits/Second", "Count/Second", "None",
}  # fmt: skip


def assert_valid_emf(document: dict[str, Any]) -> None:
    aws = document["_aws"]
    assert isinstance(aws["Timestamp"], int) and aws["Timestamp"] > 1_600_000_000_000
    directives = aws["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    for directive in directives:
        assert isinstance(directive["Namespace"], str) and 1 <= len(directive["Namespace"]) <= 255
        assert isinstance(directive["Dimensions"], list)
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list) and len(dimension_set) <= 30
            for name in dimension_set:
                assert isinstance(document[name], str), f"dimension {name} must be a string member"
        assert 1 <= len(directive["Metrics"]) <= 100
        for metric in directive["Metrics"]:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert metric["Unit"] in CLOUDWATCH_UNITS
            value = document[metric["Name"]]
            assert isinstance(value, int | float) and not isinstance(value, bool)


def emf_lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == logger]


def test_emit_writes_one_valid_document(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.metrics")
    metrics.emit({"TokensSpent": 2, "LatencyMs": 3.5}, dimensions={"Quality": "hd"})
    [line] = emf_lines(caplog, "dreamlens.metrics")
    assert_valid_emf(line)
    assert (line["TokensSpent"], line["Quality"], line["Function"]) == (2, "hd", "local")
    units = {m["Name"]: m["Unit"] for m in line["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units == {"TokensSpent": "Count", "LatencyMs": "Milliseconds"}


def test_function_dimension_is_the_deployed_functions_short_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "dreamlens-prod-generations")
    metrics.function_name.cache_clear()  # read once per process: this test is another process
    try:
        document = metrics.document({"Requests": 1})
    finally:
        metrics.function_name.cache_clear()
    assert document["Function"] == "generations"
    assert_valid_emf(document)


def test_nothing_is_written_for_no_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.metrics")
    metrics.emit({})
    assert emf_lines(caplog, "dreamlens.metrics") == []


@pytest.mark.parametrize("version", sorted(EVENT_BUILDERS))
async def test_request_line_is_an_emf_document(version: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.request")
    response = await invoke(handler, EVENT_BUILDERS[version]("GET", "/api/health"))
    assert response.status == 200
    [line] = emf_lines(caplog, "dreamlens.request")
    assert_valid_emf(line)
    assert (line["Route"], line["Status"], line["Requests"]) == ("/api/health", "200", 1)
    assert line["DbRoundTrips"] == db.trips(1)
    assert line["LatencyMs"] == line["duration_ms"]


async def test_job_metrics_are_emf(admin: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.metrics")
    user_id = await db.insert_user(admin, clerk_id="user_metrics")
    await admin.execute("update user_tokens set balance = 99 where user_id = $1", user_id)
    result = await jobs.audit_ledger()
    assert result == {"violations": 2}  # the ledger sum and the earned-minus-spent totals
    [line] = emf_lines(caplog, "dreamlens.metrics")
    assert_valid_emf(line)
    assert line["LedgerViolations"] == 2
    await admin.execute("update user_tokens set balance = 10 where user_id = $1", user_id)
    caplog.clear()
    await jobs.prune_usage(now=datetime.now(UTC) + timedelta(days=1))
    [line] = emf_lines(caplog, "dreamlens.metrics")
    assert_valid_emf(line)


def test_inside_lambda_lines_reach_stdout_as_bare_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: through the Lambda runtime's root handler every line got a
    `[INFO]\\t<time>\\t<request id>\\t` prefix, and CloudWatch extracts EMF only
    from a log event that is a JSON object: the metrics would never appear."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "dreamlens-prod-tokens")
    caplog.set_level(logging.INFO)
    lines = metrics.JsonLines(logging.getLogger("dreamlens.metrics.lambda_test"))
    lines.write(json.dumps(metrics.document({"TokensSpent": 1})))
    lines.write(json.dumps(metrics.document({"TokensSpent": 2})), logging.ERROR)
    first, second = capsys.readouterr().out.splitlines()
    for line, spent in ((first, 1), (second, 2)):
        document = json.loads(line)  # the whole line is the JSON document
        assert_valid_emf(document)
        assert document["TokensSpent"] == spent
    assert caplog.records == []  # not through logging: no handler adds a prefix


def test_outside_lambda_lines_go_through_the_logger(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.metrics.local_test")
    lines = metrics.JsonLines(logging.getLogger("dreamlens.metrics.local_test"))
    lines.write('{"a":1}', logging.ERROR)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("dreamlens.metrics.local_test", logging.ERROR, '{"a":1}')
    ]
    assert capsys.readouterr().out == ""


def test_inside_a_request_emitted_metrics_join_its_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.metrics")
    with metrics.gathered() as counted:
        metrics.emit({"TokensSpent": 2})
        metrics.emit({"TokensSpent": 3})
        metrics.emit({"WebhookNotifications": 1}, dimensions={"Outcome": "credited"})
    assert emf_lines(caplog, "dreamlens.metrics") == []  # nothing written on its own
    line = metrics.document({"Requests": 1}, {"Route": "/api/x"}, more=counted)
    assert_valid_emf(line)
    assert (line["TokensSpent"], line["WebhookNotifications"], line["Outcome"]) == (5, 1, "credited")
    assert [d["Dimensions"] for d in line["_aws"]["CloudWatchMetrics"]] == [
        [["Function", "Route"]],
        [["Function"]],
        [["Function", "Outcome"]],
    ]


def test_a_metric_that_would_clash_with_the_request_line_gets_a_line_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dreamlens.metrics")
    with metrics.gathered() as counted:
        metrics.emit({"Requests": 7})  # the request line's own metric name
        metrics.emit({"Jobs": 1}, dimensions={"Route": "elsewhere"})  # another Route value
    line = metrics.document({"Requests": 1}, {"Route": "/api/x"}, more=counted)
    assert_valid_emf(line)
    assert (line["Requests"], line["Route"], len(line["_aws"]["CloudWatchMetrics"])) == (1, "/api/x", 1)
    own = emf_lines(caplog, "dreamlens.metrics")
    assert [(m.get("Requests"), m.get("Jobs"), m.get("Route")) for m in own] == [
        (7, None, None),
        (None, 1, "elsewhere"),
    ]
    for document in own:
        assert_valid_emf(document)
