"""Graders that call a service: an HTTP scoring endpoint, and an LLM judge behind an OpenAI-compatible
chat-completions API. Standard library HTTP (urllib) from a thread pool bounded by maxConcurrency; bounded
answers; retries with backoff on connection errors, timeouts, 429 and 5xx.

The bearer token is read once from the Secret's file (<secrets dir>/<secret>/<key>) and only ever put in
the Authorization header: never in a message, a log line, an exception or repr().
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from whetstone_api.rewardgrader import HTTPGrader, ModelJudgeGrader, SecretKeyRef

from . import templates
from .graders import Grader, Item
from .types import (
    BAD_RESPONSE,
    HTTP_STATUS,
    INFINITE,
    NAN,
    NETWORK,
    NOT_A_NUMBER,
    OUT_OF_RANGE,
    TIMEOUT,
    Grade,
    GraderConfigError,
    GradingError,
    Sample,
)

MAX_ANSWER_BYTES = 1 << 20
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_secret(grader: str, ref: SecretKeyRef, secrets_dir: Path) -> str:
    path = secrets_dir / ref.name / ref.key
    try:
        return path.read_text().strip()
    except OSError as e:
        raise GraderConfigError(
            f"RewardGrader {grader}: cannot read key {ref.key!r} of Secret {ref.name!r} at {path} "
            f"({e.strerror}); the operator mounts a job's grader Secrets under {secrets_dir}"
        ) from None


def finite(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise GradingError(NOT_A_NUMBER, f"{what} is {type(value).__name__}, not a number")
    number = float(value)
    if math.isnan(number):
        raise GradingError(NAN, f"{what} is NaN")
    if math.isinf(number):
        raise GradingError(INFINITE, f"{what} is {number}")
    return number


class Remote(Grader):
    """POSTs JSON, retries what may pass, and fans a batch out over maxConcurrency threads."""

    def __init__(
        self, name: str, url: str, timeout: float, concurrency: int, retries: int, token: str | None
    ):
        super().__init__(name)
        self.url, self.timeout, self.retries = url, timeout, retries
        self._token = token
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"grader-{name}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.url!r})"

    def post(self, body: Mapping[str, Any]) -> Any:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        attempt = 0
        while True:
            try:
                return self._post_once(data, headers)
            except GradingError as e:
                retryable = e.reason in (TIMEOUT, NETWORK) or (
                    e.reason == HTTP_STATUS and e.message.startswith(("HTTP 429", "HTTP 5"))
                )
                if not retryable or attempt >= self.retries:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5.0))
                attempt += 1

    def _post_once(self, data: bytes, headers: dict[str, str]) -> Any:
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise GradingError(HTTP_STATUS, f"HTTP {e.code} from {self.url}") from None
        except TimeoutError:
            raise GradingError(TIMEOUT, f"no answer from {self.url} within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise GradingError(TIMEOUT, f"no answer from {self.url} within {self.timeout:g} s") from None
            raise GradingError(NETWORK, f"cannot reach {self.url}: {e.reason}") from None
        except OSError as e:
            raise GradingError(NETWORK, f"cannot reach {self.url}: {e.strerror or e}") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise GradingError(BAD_RESPONSE, f"{self.url} answered more than {MAX_ANSWER_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise GradingError(BAD_RESPONSE, f"{self.url} did not answer JSON") from None

    def grade_many(self, samples: Sequence[Sample], items: Sequence[Item]) -> list[Grade]:
        def one(pair: tuple[Sample, Item]) -> Grade:
            started = time.perf_counter()
            try:
                return Grade(self.grade(*pair), seconds=time.perf_counter() - started)
            except GradingError as e:
                return Grade(None, e.reason, e.message, time.perf_counter() - started)

        return list(self._pool.map(one, zip(samples, items, strict=True)))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class HTTP(Remote):
    """POST {"sample": {...}, "item": {...}} -> {"score": number, "reason"?: text}."""

    def __init__(self, name: str, spec: HTTPGrader, secrets_dir: Path) -> None:
        token = read_secret(name, spec.secret, secrets_dir) if spec.secret else None
        super().__init__(name, spec.url, spec.timeout_seconds, spec.max_concurrency, spec.retries, token)

    def grade(self, sample: Sample, item: Item) -> float:
        answer = self.post({"sample": sample.as_dict(), "item": dict(item)})
        if not isinstance(answer, dict) or "score" not in answer:
            raise GradingError(BAD_RESPONSE, f'{self.url} answered without "score"')
        return finite(answer["score"], f"the score from {self.url}")


class ModelJudge(Remote):
    """The first number in the judge's reply, rescaled from [low, high] to [0, 1]."""

    def __init__(self, name: str, spec: ModelJudgeGrader, secrets_dir: Path) -> None:
        token = read_secret(name, spec.secret, secrets_dir) if spec.secret else None
        url = spec.endpoint.rstrip("/") + "/chat/completions"
        super().__init__(name, url, spec.timeout_seconds, spec.max_concurrency, spec.retries, token)
        self.spec = spec
        templates.check(spec.prompt)
        if spec.system:
            templates.check(spec.system)

    def grade(self, sample: Sample, item: Item) -> float:
        messages = []
        if self.spec.system:
            messages.append({"role": "system", "content": templates.render(self.spec.system, sample, item)})
        messages.append({"role": "user", "content": templates.render(self.spec.prompt, sample, item)})
        answer = self.post(
            {
                "model": self.spec.model,
                "messages": messages,
                "temperature": self.spec.temperature,
                "max_tokens": self.spec.max_tokens,
            }
        )
        try:
            reply = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GradingError(BAD_RESPONSE, f"{self.url} answered no choices[0].message.content") from None
        if not isinstance(reply, str):
            raise GradingError(BAD_RESPONSE, "the judge's reply is not text")
        match = _NUMBER.search(reply)
        if match is None:
            raise GradingError(BAD_RESPONSE, f"no number in the judge's reply {reply[:80]!r}")
        value = finite(float(match.group()), "the judge's number")
        low, high = self.spec.range
        if not low <= value <= high:
            raise GradingError(OUT_OF_RANGE, f"the judge said {value:g}, outside [{low:g}, {high:g}]")
        return (value - low) / (high - low)
