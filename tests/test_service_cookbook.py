"""The public tinker-cookbook 0.6.1 recipes, unmodified, against `whetstone serve`, offline: supervised
(recipes.sl_basic on a local JSONL), RL (recipes.math_rl, env=arithmetic, loss_fn=importance_sampling) and
DPO (preference.train_dpo on a local comparisons JSONL), each with the smallest settings.

The served model is whetstone://tiny-qwen3-moe (a tiny Qwen3-MoE with the exact Qwen3 tokenizer) under the
name Qwen/Qwen3-30B-A3B, a Qwen3 model the cookbook knows (renderer qwen3); its tokenizer is installed into a
private Hugging Face cache under that name and the recipes run with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("tinker_cookbook", reason="the dev extra installs tinker-cookbook")
from service_harness import ALICE, Server, running_server  # noqa: E402

NAME = "Qwen/Qwen3-30B-A3B"


@pytest.fixture(scope="module")
def cookbook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str], Path]]:
    from whetstone_trainer.models.tiny_moe import install_tokenizer_in_hf_cache

    tmp = tmp_path_factory.mktemp("cookbook")
    install_tokenizer_in_hf_cache(tmp / "hf", (NAME,))
    env = dict(
        os.environ, TINKER_API_KEY=ALICE, HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1", TINKER_TELEMETRY="0"
    )
    with running_server(tmp, "whetstone://tiny-qwen3-moe", "--model-name", NAME) as server:
        yield server, env, tmp


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def test_sl_basic(cookbook: tuple[Server, dict[str, str], Path]) -> None:
    server, env, tmp = cookbook
    import tinker_cookbook

    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    out = run(
        [
            sys.executable,
            "-m",
            "tinker_cookbook.recipes.sl_basic",
            f"model_name={NAME}",
            f"base_url={server.url}",
            f"log_path={tmp / 'sl'}",
            "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
            f"dataset_builder.file_path={data}",
            "dataset_builder.common_config.batch_size=4",
            f"dataset_builder.common_config.model_name_for_tokenizer={NAME}",
            "dataset_builder.common_config.renderer_name=qwen3",
            "dataset_builder.common_config.max_length=256",
            "eval_every=0",
            "save_every=2",
            "max_steps=2",
        ],
        env,
        tmp,
    )
    assert "Training completed successfully" in out
    metrics = [json.loads(line) for line in (tmp / "sl" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["train_mean_nll"] > 0 for m in metrics)


def test_math_rl_arithmetic_importance_sampling(cookbook: tuple[Server, dict[str, str], Path]) -> None:
    server, env, tmp = cookbook
    out = run(
        [
            sys.executable,
            "-m",
            "tinker_cookbook.recipes.math_rl.train",
            f"model_name={NAME}",
            "env=arithmetic",
            f"base_url={server.url}",
            "loss_fn=importance_sampling",
            "groups_per_batch=2",
            "group_size=2",
            "max_steps=2",
            "max_tokens=8",
            "eval_every=0",
            "save_every=2",
            f"log_path={tmp / 'rl'}",
            "behavior_if_log_dir_exists=delete",
        ],
        env,
        tmp,
    )
    assert "Training completed successfully" in out


DPO_SCRIPT = """
import asyncio, sys
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

name, url, data, log = sys.argv[1:5]
common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=name, renderer_name="qwen3", max_length=256,
                                        batch_size=4)
builder = DPODatasetBuilderFromComparisons(common_config=common,
                                           comparison_builder=ComparisonBuilderFromJsonl(train_path=data))
config = train_dpo.Config(log_path=log, model_name=name, recipe_name="dpo-test", dataset_builder=builder,
                          renderer_name="qwen3", dpo_beta=0.1, base_url=url, max_steps=2, save_every=2,
                          eval_every=0, lora_rank=8)
result = train_dpo.main(config)
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def test_dpo_on_local_comparisons(cookbook: tuple[Server, dict[str, str], Path]) -> None:
    server, env, tmp = cookbook
    rows = []
    for a, b in [(2, 3), (4, 1), (5, 5), (7, 2), (1, 8), (6, 3), (9, 0), (3, 4)]:
        prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
        rows.append(
            {
                "comparison": {
                    "prompt_conversation": prompt,
                    "completion_A": [{"role": "assistant", "content": str(a + b)}],
                    "completion_B": [{"role": "assistant", "content": str(a + b + 1)}],
                },
                "label": "A",
            }
        )
    data = tmp / "comparisons.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run([sys.executable, "-c", DPO_SCRIPT, NAME, server.url, str(data), str(tmp / "dpo")], env, tmp)
    metrics = [json.loads(line) for line in (tmp / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2, out[-2000:]
    assert all(m["num_pairs"] > 0 and m["dpo_loss"] > 0 for m in metrics)
