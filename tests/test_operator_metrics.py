"""The operator's metric names and labels (documented in the README) are what /metrics exposes."""

from __future__ import annotations

from whetstone_operator.metrics import OperatorMetrics


def test_metric_names_and_labels() -> None:
    m = OperatorMetrics()
    m.reconciles.labels("FineTuneJob", "ok").inc()
    m.reconcile_duration.labels("FineTuneJob").observe(0.02)
    m.watch_events.labels("pods").inc()
    m.last_watch_event.labels("pods").set_to_current_time()
    m.time_to_running.labels("ns").observe(12)
    m.restarts.labels("ns").inc()
    m.transitions.labels("ns", "Running").inc()
    m.checkpoints.labels("ns").inc()
    m.jobs.set("ns", "a", "Running")
    m.jobs.set("ns", "b", "Running")
    m.jobs.set("ns", "c", "Failed")
    text = m.exposition().decode()
    for line in (
        'whetstone_operator_reconciles_total{kind="FineTuneJob",result="ok"} 1.0',
        'whetstone_operator_reconcile_duration_seconds_count{kind="FineTuneJob"} 1.0',
        'whetstone_operator_watch_events_total{resource="pods"} 1.0',
        'whetstone_job_time_to_running_seconds_count{namespace="ns"} 1.0',
        'whetstone_job_restarts_total{namespace="ns"} 1.0',
        'whetstone_job_transitions_total{namespace="ns",phase="Running"} 1.0',
        'whetstone_checkpoints_created_total{namespace="ns"} 1.0',
        'whetstone_jobs{namespace="ns",phase="Running"} 2.0',
        'whetstone_jobs{namespace="ns",phase="Failed"} 1.0',
        'whetstone_jobs{namespace="ns",phase="Pending"} 0.0',
    ):
        assert line in text, line
    assert 'whetstone_operator_last_watch_event_timestamp_seconds{resource="pods"}' in text
    m.jobs.forget("ns", "c")
    assert 'whetstone_jobs{namespace="ns",phase="Failed"} 0.0' in m.exposition().decode()
