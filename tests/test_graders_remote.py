"""http and modelJudge graders against a stub server that this test starts on 127.0.0.1 (a stand-in for a
user's scoring service and for an OpenAI-compatible chat endpoint: neither can be reached from here)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from whetstone_api.rewardgrader import RewardGraderSpec
from whetstone_graders import GraderConfigError, GraderSet, Sample, run_test_cases

TOKEN = "tok-0123456789-very-secret"


class Stub:
    """Records every request; answers by path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.failures_left = 0
        self.lock = threading.Lock()
        self.judge_reply = "Score: 7"


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self.answer(body)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def answer(self, body: dict[str, Any]) -> None:
            if self.path == "/slow":
                time.sleep(0.15)
            if self.path == "/hang":
                time.sleep(3)
            if self.path == "/flaky":
                with state.lock:
                    failing = state.failures_left > 0
                    state.failures_left -= 1
                if failing:
                    return self.reply(503, b"busy")
            if self.path == "/missing":
                return self.reply(404, b"no")
            if self.path == "/not-json":
                return self.reply(200, b"<html>")
            if self.path == "/v1/chat/completions":
                content = {"choices": [{"message": {"role": "assistant", "content": state.judge_reply}}]}
                return self.reply(200, json.dumps(content).encode())
            score = float(body["sample"]["output_text"] == body["item"]["answer"])
            return self.reply(200, json.dumps({"score": score}).encode())

        def reply(self, code: int, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    (tmp_path / "scorer").mkdir()
    (tmp_path / "scorer" / "token").write_text(TOKEN + "\n")
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "api-key").write_text("judge-key")
    return tmp_path


def http(url: str, **extra: Any) -> RewardGraderSpec:
    return RewardGraderSpec.model_validate({"http": {"url": url, **extra}})


def test_http_grader_posts_sample_and_item_with_the_secret_token(
    stub: tuple[Stub, str], secrets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, base = stub
    caplog.set_level(logging.DEBUG)
    spec = http(f"{base}/score", secret={"name": "scorer"})
    with GraderSet([("svc", 1.0)], {"svc": spec}, secrets_dir=secrets) as graders:
        right, wrong = graders.grade(
            [Sample('{"a": 1}'), Sample("no")], [{"answer": '{"a": 1}'}, {"answer": "x"}]
        )
        assert (right.total, wrong.total) == (1.0, 0.0)
        assert state.requests[0]["body"] == {
            "sample": {"output_text": '{"a": 1}', "output_json": {"a": 1}},
            "item": {"answer": '{"a": 1}'},
        }
        assert {r["auth"] for r in state.requests} == {f"Bearer {TOKEN}"}
        seen = repr(graders.stats()) + repr(graders._graders) + repr(right) + caplog.text
    assert TOKEN not in seen


def test_http_concurrency_is_bounded_by_max_concurrency(stub: tuple[Stub, str]) -> None:
    state, base = stub
    with GraderSet([("svc", 1.0)], {"svc": http(f"{base}/slow", maxConcurrency=3)}) as graders:
        rewards = graders.grade([Sample("a")] * 12, [{"answer": "a"}] * 12)
    assert [r.total for r in rewards] == [1.0] * 12
    assert state.max_in_flight == 3


def test_http_errors_have_reasons_and_retries_pass_transient_failures(stub: tuple[Stub, str]) -> None:
    state, base = stub
    specs = {
        "hangs": http(f"{base}/hang", timeoutSeconds=0.3, retries=0),
        "missing": http(f"{base}/missing"),
        "not-json": http(f"{base}/not-json"),
        "refused": http("http://127.0.0.1:9/", retries=1),
    }
    with GraderSet([(n, 1.0) for n in specs], specs) as graders:
        (reward,) = graders.grade([Sample("a")], [{"answer": "a"}])
        errors = graders.stats().errors
    assert {n: g.error for n, g in reward.grades.items()} == {
        "hangs": "timeout",
        "missing": "http_status",
        "not-json": "bad_response",
        "refused": "network",
    }
    assert reward.grades["missing"].message == f"HTTP 404 from {base}/missing"
    assert sum(1 for r in state.requests if r["path"] == "/missing") == 1  # a 404 is not retried
    assert errors[("refused", "network")] == 1
    state.failures_left = 2
    with GraderSet([("flaky", 1.0)], {"flaky": http(f"{base}/flaky", retries=2)}) as graders:
        (reward,) = graders.grade([Sample("a")], [{"answer": "a"}])
    assert reward.total == 1.0 and sum(1 for r in state.requests if r["path"] == "/flaky") == 3


def test_a_missing_secret_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(GraderConfigError, match="key 'token' of Secret 'absent'") as e:
        GraderSet([("svc", 1.0)], {"svc": http("http://127.0.0.1:9/", secret={"name": "absent"})}, tmp_path)
    assert str(tmp_path / "absent" / "token") in str(e.value)


def judge(base: str, **extra: Any) -> RewardGraderSpec:
    body = {
        "endpoint": f"{base}/v1",
        "model": "judge-1",
        "prompt": "Question: {{ item.question }}\nAnswer: {{ sample.output_text }}\nScore 0-10.",
        "range": [0, 10],
        **extra,
    }
    return RewardGraderSpec.model_validate({"modelJudge": body})


def test_model_judge_renders_the_prompt_parses_a_number_and_rescales(
    stub: tuple[Stub, str], secrets: Path
) -> None:
    state, base = stub
    spec = judge(base, system="You grade {{ item.topic }}.", secret={"name": "judge", "key": "api-key"})
    with GraderSet([("judge", 1.0)], {"judge": spec}, secrets_dir=secrets) as graders:
        (reward,) = graders.grade([Sample("4")], [{"question": "2+2?", "topic": "sums"}])
    assert reward.total == pytest.approx(0.7)
    request = state.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer judge-key"
    assert request["body"]["model"] == "judge-1" and request["body"]["temperature"] == 0.0
    assert request["body"]["messages"] == [
        {"role": "system", "content": "You grade sums."},
        {"role": "user", "content": "Question: 2+2?\nAnswer: 4\nScore 0-10."},
    ]


@pytest.mark.parametrize(
    ("reply", "score", "error"),
    [
        ("10", 1.0, None),
        ("I'd say 2.5 out of 10", 0.25, None),
        ("eleven", None, "bad_response"),
        ("15", None, "out_of_range"),
        ("-3", None, "out_of_range"),
    ],
)
def test_model_judge_replies(
    stub: tuple[Stub, str], reply: str, score: float | None, error: str | None
) -> None:
    state, base = stub
    state.judge_reply = reply
    with GraderSet(
        [("judge", 1.0)], {"judge": judge(base).model_copy(update={"on_error": "skip"})}
    ) as graders:
        (reward,) = graders.grade([Sample("x")], [{"question": "q"}])
    assert (reward.total, reward.grades["judge"].error) == (score, error)


def test_remote_test_cases_run_through_the_same_path(stub: tuple[Stub, str]) -> None:
    _, base = stub
    spec = RewardGraderSpec.model_validate(
        {
            "http": {"url": f"{base}/score"},
            "testCases": [
                {"sample": "a", "item": {"answer": "a"}, "expectedScore": 1},
                {"sample": "a", "item": {"answer": "b"}, "expectedScore": 1},
            ],
        }
    )
    report = run_test_cases("svc", spec)
    assert report.summary() == "test case 1 expected 1, got 0"
