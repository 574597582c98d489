"""The trainer's /healthz, /metrics and /status, as the operator and Prometheus read them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from whetstone_api.wire import TrainerReport
from whetstone_trainer.status_server import TrainerStatus, serve


def _get(port: int, path: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()


def test_status_metrics_and_health_follow_the_run(tmp_path: Path) -> None:
    status = TrainerStatus("demo", tmp_path, rank=0, world_size=2)
    server = serve(status, 0, host="127.0.0.1")
    port = server.server_address[1]
    try:
        assert _get(port, "/healthz")[1] == "ok\n"
        assert json.loads(_get(port, "/status")[1])["phase"] == "Starting"

        status.on_start(0, 10)
        status.on_step(
            {
                "step": 1,
                "total_steps": 10,
                "epoch": 0.1,
                "loss": 2.5,
                "tokens": 100,
                "tokens_per_second": 50.0,
            }
        )
        ckpt = tmp_path / "checkpoints" / "step-00000001"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "metrics": {"loss": 2.5}}))
        status.on_checkpoint(1, ckpt, [tmp_path / "checkpoints" / "step-00000000"])
        status.on_step(
            {
                "step": 2,
                "total_steps": 10,
                "epoch": 0.2,
                "loss": 2.0,
                "tokens": 100,
                "tokens_per_second": 60.0,
                "eval_loss": 2.2,
            }
        )

        body = json.loads(_get(port, "/status")[1])
        assert body["phase"] == "Training" and body["step"] == 2 and body["totalSteps"] == 10
        assert body["loss"] == 2.0 and body["evalLoss"] == 2.2 and body["worldSize"] == 2
        assert body["etaSeconds"] is not None and body["etaSeconds"] >= 0
        assert body["checkpoints"] == [
            {"step": 1, "uri": str(ckpt), "kind": "resumable", "metrics": {"loss": 2.5}}
        ]
        # What the operator reads: the contract's strict parse accepts it as is.
        report = TrainerReport.parse(_get(port, "/status")[1].encode())
        assert report.step == 2 and report.checkpoints[0].uri == str(ckpt)

        content_type, text = _get(port, "/metrics")
        assert content_type.startswith("text/plain")
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["whetstone_trainer_step"] == 2 and samples["whetstone_trainer_loss"] == 2.0
        assert samples["whetstone_trainer_tokens_total"] == 200
        assert samples["whetstone_trainer_checkpoints_saved_total"] == 1
        assert samples["whetstone_trainer_checkpoints_pruned_total"] == 1

        status.on_finish({"output": str(tmp_path / "final")})
        assert json.loads(_get(port, "/status")[1])["phase"] == "Finished"
    finally:
        server.shutdown()
