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


def test_per_job_gauges_exist_only_while_the_job_does() -> None:
    m = OperatorMetrics()
    m.set_progress("ns", "a", {"step": 12, "loss": 1.25, "reward": 0.5})
    m.set_progress("ns", "b", {"step": 3})
    m.disruptions.labels("ns").inc()
    text = m.exposition().decode()
    for line in (
        'whetstone_job_step{job="a",namespace="ns"} 12.0',
        'whetstone_job_loss{job="a",namespace="ns"} 1.25',
        'whetstone_job_reward{job="a",namespace="ns"} 0.5',
        'whetstone_job_step{job="b",namespace="ns"} 3.0',
        'whetstone_job_disruptions_total{namespace="ns"} 1.0',
    ):
        assert line in text, line
    m.forget_job("ns", "a")
    text = m.exposition().decode()
    assert 'job="a"' not in text and 'whetstone_job_step{job="b",namespace="ns"} 3.0' in text


def test_healthz_and_metrics_are_served_and_nothing_else() -> None:
    import socket
    import urllib.error
    import urllib.request

    from whetstone_operator.metrics import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = OperatorMetrics()
    metrics.watch_events.labels("pods").inc()
    server = serve(metrics, "127.0.0.1", port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b"ok\n"
        answer = urllib.request.urlopen(f"{base}/metrics", timeout=5)
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert b'whetstone_operator_watch_events_total{resource="pods"} 1.0' in answer.read()
        try:
            urllib.request.urlopen(f"{base}/other", timeout=5)
            raise AssertionError("an unknown path was answered")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        server.shutdown()
        server.server_close()
