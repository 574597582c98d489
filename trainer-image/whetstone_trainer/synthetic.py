"""Synthetic chat tasks that a ~1M-parameter model learns in a minute on a CPU: they let tests and examples
assert that training works (held-out exact match rises), not only that it runs."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

Task = Callable[[random.Random], tuple[str, str]]


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def reverse(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 3, 6)
    return f"Reverse {s}", s[::-1]


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


def repeat(rng: random.Random) -> tuple[str, str]:
    d = rng.choice("0123456789")
    return f"Repeat {d}", d


def even(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    return f"Is {n} even?", "yes" if n % 2 == 0 else "no"


def odd(rng: random.Random) -> tuple[str, str]:
    d = rng.randint(0, 9)
    return f"Is {d} odd?", "yes" if d % 2 else "no"


def copy(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng, 3, 8)
    return f"Copy {s}", s


def json_answer(rng: random.Random) -> tuple[str, str]:
    """Answer in a fixed JSON shape: a format-following task for small instruct models."""
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return f"What is {a} plus {b}? Reply in JSON.", json.dumps({"answer": a + b})


_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Emeka",
    "Farah",
    "Goran",
    "Hana",
    "Ivo",
    "Jun",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
]
_CITIES = [
    "Paris",
    "Lagos",
    "Osaka",
    "Lima",
    "Oslo",
    "Cairo",
    "Quito",
    "Perth",
    "Turin",
    "Hanoi",
    "Accra",
    "Kyiv",
    "Porto",
    "Dakar",
    "Seoul",
    "Bern",
    "Dublin",
    "Austin",
    "Delhi",
    "Riga",
]
_JOBS = ["baker", "nurse", "pilot", "teacher", "welder", "chemist", "lawyer", "farmer", "designer", "plumber"]


def json_extract(rng: random.Random) -> tuple[str, str]:
    """Pull three facts out of a sentence into a fixed JSON shape: a format-following task that a small
    instruct model does not do exactly out of the box."""
    name, city, job, year = (
        rng.choice(_NAMES),
        rng.choice(_CITIES),
        rng.choice(_JOBS),
        rng.randint(1990, 2024),
    )
    sentence = rng.choice(
        [
            f"{name} moved to {city} in {year} and works as a {job}.",
            f"In {year}, {name} settled in {city}, where they work as a {job}.",
            f"A {job} named {name} has lived in {city} since {year}.",
        ]
    )
    question = f"{sentence}\nReturn JSON with keys name, city and year."
    return question, json.dumps({"name": name, "city": city, "year": year})


TASKS: dict[str, Task] = {
    "reverse": reverse,
    "add": add,
    "repeat": repeat,
    "even": even,
    "odd": odd,
    "copy": copy,
    "json-answer": json_answer,
    "json-extract": json_extract,
}


def make_rows(task: str, n: int, seed: int, system: str | None = None) -> list[dict]:
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for _ in range(n):
        question, answer = TASKS[task](rng)
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corrupt(rng: random.Random, answer: str) -> str:
    """A wrong answer of the same shape: the same length, at least one digit changed."""
    digits = list(answer)
    while "".join(digits) == answer:
        i = rng.randrange(len(digits))
        digits[i] = rng.choice("0123456789")
    return "".join(digits)


def make_preference_rows(task: str, n: int, seed: int, shape: str = "openai") -> list[dict]:
    """Preference pairs for DPO: the task's correct answer is preferred to a corrupted one (same length, some
    digits changed). `shape` is openai (input / preferred_output / non_preferred_output) or trl
    (prompt / chosen / rejected, conversational)."""
    rng = random.Random(f"{task}-pref-{seed}")
    rows = []
    for _ in range(n):
        question, answer = TASKS[task](rng)
        wrong = _corrupt(rng, answer)
        prompt = [{"role": "user", "content": question}]
        if shape == "openai":
            rows.append(
                {
                    "input": {"messages": prompt},
                    "preferred_output": [{"role": "assistant", "content": answer}],
                    "non_preferred_output": [{"role": "assistant", "content": wrong}],
                }
            )
        else:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )
    return rows


def make_prompt_rows(task: str, n: int, seed: int) -> list[dict]:
    """RFT prompt rows: the question as the user's message and the expected answer as a field graders read
    ({{ item.answer }})."""
    rng = random.Random(f"{task}-prompt-{seed}")
    rows = []
    for _ in range(n):
        question, answer = TASKS[task](rng)
        rows.append({"messages": [{"role": "user", "content": question}], "answer": answer})
    return rows
