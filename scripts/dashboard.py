"""The Grafana dashboard, as a list of panels: `python scripts/render_deploy.py` writes it to
helm/whetstone/files/dashboards/whetstone.json, which the chart ships as a ConfigMap for the Grafana sidecar.

Every query names metrics that exist: the operator's (operator/whetstone_operator/metrics.py) and the
trainer's (whetstone_trainer_*, label job = the FineTuneJob, namespace from the PodMonitor).
e2e/test_tryout.py runs each query against a real Prometheus that scraped a real run and fails on a query
that returns nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

UID = "whetstone-overview"
# Trainer series: every pod of a job serves the same values, so gauges are taken once per job.
SEL = '{namespace=~"$namespace", job=~"$job"}'
NS = '{namespace=~"$namespace"}'


def by_job(metric: str) -> str:
    return f"max by (namespace, job) (whetstone_trainer_{metric}{SEL})"


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    description: str = ""


@dataclass
class Row:
    title: str
    # Which runs produce the row's series: "operator", "training" (every method), "dpo" or "rft".
    needs: str
    panels: list[Panel] = field(default_factory=list)


ROWS: list[Row] = [
    Row(
        "Operator",
        "operator",
        [
            Panel("Operator up", [('max(up{job="whetstone-operator"})', "up")], kind="stat", width=4),
            Panel(
                "FineTuneJobs by phase",
                [(f"sum by (phase) (whetstone_jobs{NS})", "{{phase}}")],
                width=10,
            ),
            Panel(
                "Phase changes (5 min)",
                [(f"sum by (phase) (increase(whetstone_job_transitions_total{NS}[5m]))", "{{phase}}")],
                width=10,
            ),
            Panel(
                "Reconciles per second",
                [
                    (
                        "sum by (kind, result) (rate(whetstone_operator_reconciles_total[$__rate_interval]))",
                        "{{kind}} {{result}}",
                    )
                ],
            ),
            Panel(
                "Reconcile duration",
                [
                    (
                        f"histogram_quantile({q}, sum by (le, kind) "
                        "(rate(whetstone_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
                        f"{{{{kind}}}} p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
                unit="s",
            ),
            Panel(
                "Watch events per second",
                [
                    (
                        "sum by (resource) (rate(whetstone_operator_watch_events_total[$__rate_interval]))",
                        "{{resource}}",
                    )
                ],
            ),
            Panel(
                "Since the last watch event",
                [
                    (
                        "time() - max by (resource) (whetstone_operator_last_watch_event_timestamp_seconds)",
                        "{{resource}}",
                    )
                ],
                unit="s",
                description="A stalled watch stream (kopf's known failure) keeps growing while jobs run.",
            ),
            Panel(
                "Time to running",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) "
                        f"(increase(whetstone_job_time_to_running_seconds_bucket{NS}[$__range])))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
                unit="s",
                kind="stat",
                description="Creation to all pods running, first attempt, over the dashboard's range.",
            ),
            Panel(
                "API calls per second",
                [
                    (
                        "sum by (resource, verb) "
                        "(rate(whetstone_operator_api_calls_total[$__rate_interval]))",
                        "{{verb}} {{resource}}",
                    ),
                    (
                        "sum(rate(whetstone_operator_events_dropped_total[$__rate_interval]))",
                        "Events dropped",
                    ),
                ],
                description="What the operator costs the API server (watches excluded), and the Events it "
                "dropped while the server was behind.",
            ),
            Panel(
                "Group restarts",
                [
                    (
                        f"sum by (namespace) (increase(whetstone_job_restarts_total{NS}[$__range]))",
                        "{{namespace}}",
                    )
                ],
                kind="stat",
            ),
            Panel(
                "Restarts after disruptions",
                [
                    (
                        f"sum by (namespace) (increase(whetstone_job_disruptions_total{NS}[$__range]))",
                        "{{namespace}}",
                    )
                ],
                kind="stat",
                description="Preemptions and evictions: restarts not counted against backoffLimit.",
            ),
            Panel(
                "Checkpoints created",
                [
                    (
                        f"sum by (namespace) (increase(whetstone_checkpoints_created_total{NS}[$__range]))",
                        "{{namespace}}",
                    )
                ],
                kind="stat",
            ),
        ],
    ),
    Row(
        "Training (every method)",
        "training",
        [
            Panel(
                "Loss",
                [(by_job("loss"), "{{job}} train"), (by_job("eval_loss"), "{{job}} eval")],
                width=12,
            ),
            Panel(
                "Progress",
                [(f"{by_job('step')} / {by_job('total_steps')}", "{{job}}")],
                unit="percentunit",
                width=12,
            ),
            Panel(
                "Step and loss as the operator reads them",
                [
                    (f"max by (namespace, job) (whetstone_job_step{SEL})", "{{job}} step"),
                    (f"max by (namespace, job) (whetstone_job_loss{SEL})", "{{job}} loss"),
                ],
                description="From rank 0's /status through the operator's /metrics: no PodMonitor needed.",
            ),
            Panel("Tokens per second", [(by_job("tokens_per_second"), "{{job}}")]),
            Panel(
                "Tokens trained per second (counter)",
                [
                    (
                        "sum by (namespace, job) "
                        f"(rate(whetstone_trainer_tokens_total{SEL}[$__rate_interval]))",
                        "{{job}}",
                    )
                ],
            ),
            Panel(
                "Checkpoints",
                [
                    (by_job("checkpoints_saved_total"), "{{job}} saved"),
                    (by_job("checkpoints_pruned_total"), "{{job}} pruned"),
                ],
            ),
            Panel(
                "Learning rate",
                [(by_job("lr"), "{{job}}")],
                description="The schedule's rate of the latest optimizer step.",
            ),
            Panel(
                "Gradient norm",
                [(by_job("grad_norm"), "{{job}}")],
                description="Before clipping (hyperparameters.maxGradNorm). SFT and DPO report it.",
            ),
            Panel(
                "Epochs and time",
                [
                    (by_job("epoch"), "{{job}} epoch"),
                    (by_job("elapsed_seconds") + " / 60", "{{job}} minutes"),
                ],
                description="Passes over the training data (RFT: prompts sampled over prompts), and minutes "
                "since the trainer process started training.",
            ),
        ],
    ),
    Row(
        "DPO",
        "dpo",
        [
            Panel(
                "Implicit rewards",
                [
                    (by_job("dpo_reward_chosen"), "{{job}} chosen"),
                    (by_job("dpo_reward_rejected"), "{{job}} rejected"),
                    (by_job("dpo_reward_margin"), "{{job}} margin"),
                    (by_job("eval_dpo_reward_margin"), "{{job}} eval margin"),
                ],
                width=12,
            ),
            Panel(
                "Preference accuracy",
                [
                    (by_job("preference_accuracy"), "{{job}} train"),
                    (by_job("eval_preference_accuracy"), "{{job}} eval"),
                    (by_job("eval_choice_accuracy"), "{{job}} eval choice"),
                ],
                unit="percentunit",
                width=12,
                description="eval choice: held-out pairs whose chosen answer the policy itself gives more "
                "log-probability (no reference).",
            ),
        ],
    ),
    Row(
        "RFT",
        "rft",
        [
            Panel(
                "Reward",
                [
                    (by_job("reward_mean"), "{{job}} mean"),
                    (by_job("reward_min"), "{{job}} min"),
                    (by_job("reward_max"), "{{job}} max"),
                    (by_job("reward_std"), "{{job}} std"),
                    (by_job("eval_reward_mean"), "{{job}} eval"),
                ],
                width=12,
            ),
            Panel(
                "Reward as the operator reads it",
                [(f"max by (namespace, job) (whetstone_job_reward{SEL})", "{{job}}")],
                description="From rank 0's /status through the operator's /metrics: no PodMonitor needed.",
            ),
            Panel(
                "Reward by grader",
                [
                    (
                        f"max by (namespace, job, grader) (whetstone_trainer_grader_reward_mean{SEL})",
                        "{{job}} {{grader}}",
                    )
                ],
                width=12,
            ),
            Panel(
                "Pass rate",
                [(by_job("pass_rate"), "{{job}} train"), (by_job("eval_pass_rate"), "{{job}} eval")],
                unit="percentunit",
            ),
            Panel(
                "Groups",
                [
                    (by_job("groups_sampled"), "{{job}} sampled"),
                    (by_job("groups_trained"), "{{job}} trained"),
                    (by_job("refill_rounds"), "{{job}} refill rounds"),
                ],
                description="Prompt groups per step: sampled (refills included) and trained on; zero-variance"
                " groups dropped or refilled per rft.zeroVarianceGroups.",
            ),
            Panel(
                "Samples",
                [(by_job("samples"), "{{job}} sampled"), (by_job("skipped_samples"), "{{job}} skipped")],
                description="Answers sampled in the step, and those a grader skipped (onError: skip).",
            ),
            Panel(
                "Advantages",
                [(by_job("advantage_mean"), "{{job}} mean"), (by_job("advantage_std"), "{{job}} std")],
            ),
            Panel("KL and entropy", [(by_job("kl"), "{{job}} KL"), (by_job("entropy"), "{{job}} entropy")]),
            Panel(
                "Clipped, filtered, truncated",
                [
                    (by_job("clip_fraction"), "{{job}} clipped tokens"),
                    (by_job("filtered_group_rate"), "{{job}} filtered groups"),
                    (by_job("truncation_rate"), "{{job}} truncated responses"),
                ],
                unit="percentunit",
            ),
            Panel(
                "Response length",
                [
                    (by_job("response_length_mean"), "{{job}} mean"),
                    (by_job("response_length_max"), "{{job}} max"),
                ],
            ),
            Panel("Rollout tokens per second", [(by_job("rollout_tokens_per_second"), "{{job}}")]),
            Panel(
                "Sampler vs trainer log-prob",
                [(by_job("sampler_logprob_diff"), "{{job}}")],
                description="Mean |sampler - trainer| log-prob of the sampled tokens: the inference mismatch "
                "(grows when the sampler's numerics drift from the trainer's).",
            ),
            Panel(
                "Grader latency p95",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, grader) "
                        f"(rate(whetstone_trainer_grader_latency_seconds_bucket{SEL}[$__rate_interval])))",
                        "{{grader}}",
                    )
                ],
                unit="s",
            ),
            Panel(
                "Grader errors per second",
                [
                    (
                        "sum by (grader, reason) "
                        f"(rate(whetstone_trainer_grader_errors_total{SEL}[$__rate_interval]))",
                        "{{grader}} {{reason}}",
                    )
                ],
                width=16,
            ),
        ],
    ),
]


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": expr,
                "legendFormat": legend,
                # Stat panels show one number over the range; time series are range queries.
                **({"instant": True, "range": False} if panel.kind == "stat" else {}),
            }
            for i, (expr, legend) in enumerate(panel.queries)
        ],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
    }
    if panel.description:
        body["description"] = panel.description
    return body


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += 8
    return {
        "uid": UID,
        "title": "Whetstone",
        "description": "Whetstone operator health and fine-tuning runs (SFT, DPO, RFT).",
        "tags": ["whetstone", "fine-tuning"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                _variable("namespace", "Namespace", "label_values(whetstone_jobs, namespace)"),
                _variable(
                    "job", "FineTuneJob", 'label_values(whetstone_trainer_step{namespace=~"$namespace"}, job)'
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
