"""A family of tiny Llama-style causal LMs with random weights and a real, small tokenizer.

They exist so that tests and examples can train a model that actually learns (reverse digits, add
single digits) on two CPU cores in a minute, with nothing downloaded from a model hub.

The tokenizer is a byte-level BPE with a 2048-token vocabulary, so that a 1M-parameter model spends its
parameters on the transformer rather than on the embedding, and every digit is its own token, so that
digit tasks are learnable. The trained tokenizer ships as ``assets/tiny_tokenizer.json``: the BPE trainer
of the ``tokenizers`` library breaks ties between equally frequent pairs in hash-map order, so training it
again is not guaranteed to give the same vocabulary, and the model weights must stay byte-identical.
``train_tiny_tokenizer`` is kept to show how the shipped file was made and to regenerate it.

torch and transformers are imported inside the functions: the size table and the names must be usable by
pre-flight validation, which must not import torch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

# Part of the cache key of built models: bump it whenever the output of build_tiny_model changes
# (architecture, initialisation, tokenizer, template), so that stale cached builds are not reused.
TINY_BUILDER_VERSION = "2"

TOKENIZER_ASSET = "tiny_tokenizer.json"
CORPUS_ASSET = "tiny_tokenizer_corpus.txt"
TINY_VOCAB_SIZE = 2048

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

# ChatML, as SmolLM2 and Qwen write it. Every message renders to a self-contained block that ends with a
# newline after <|im_end|>, and nothing depends on later messages, so rendering messages[:k] is a token
# prefix of rendering messages[:k + 1]: the SFT loss mask is computed by rendering prefixes.
# Tool definitions get their own system block in front rather than being merged into the user's system
# message, so that rendering zero messages is a prefix too. No default system prompt is injected.
# Every tag trims whitespace and every literal is an expression, so the line breaks here are not output.
CHATML_TEMPLATE = """
{%- if tools -%}
    {{- '<|im_start|>system\n# Tools\n\nYou may call these functions. Write each call as '
        + '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- elif message['content'] is not none -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message.get('tool_calls') -%}
        {%- for call in message['tool_calls'] -%}
            {%- set fn = call['function'] if call.get('function') else call -%}
            {%- if message['content'] or not loop.first -%}{{- '\n' -}}{%- endif -%}
            {{- '<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' -}}
            {%- if fn['arguments'] is string -%}
                {{- fn['arguments'] -}}
            {%- else -%}
                {{- fn['arguments'] | tojson -}}
            {%- endif -%}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class TinySize:
    """The shape of one tiny model; ``approx_params`` is what the size name promises."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    approx_params: int
    max_position_embeddings: int = 2048


TINY_SIZES: dict[str, TinySize] = {
    "tiny-1m": TinySize(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=320, approx_params=1_000_000
    ),
    "tiny-10m": TinySize(
        hidden_size=256, num_layers=11, num_heads=8, intermediate_size=768, approx_params=10_000_000
    ),
    "tiny-50m": TinySize(
        hidden_size=512, num_layers=14, num_heads=8, intermediate_size=1536, approx_params=50_000_000
    ),
}
TINY_ALIASES: dict[str, str] = {"tiny": "tiny-1m"}


def tiny_size_names() -> list[str]:
    """Every accepted name, aliases included, for error messages and validation."""
    return sorted([*TINY_SIZES, *TINY_ALIASES])


def resolve_tiny_size(size: str) -> str:
    """The canonical size name for ``size`` (an alias or a canonical name); ValueError names the choices."""
    name = TINY_ALIASES.get(size, size)
    if name not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of: {', '.join(tiny_size_names())}")
    return name


def _asset_path(name: str) -> Path:
    return Path(str(resources.files("whetstone_trainer") / "assets" / name))


def tokenizer_training_text() -> list[str]:
    """The tokenizer's training corpus: shipped prose plus deterministic synthetic lines.

    The synthetic part teaches the merges that the example tasks and chat data need (arithmetic, digit
    strings, JSON, a little code, ChatML markup) without shipping a large file.
    """
    prose = _asset_path(CORPUS_ASSET).read_text(encoding="utf-8")
    lines = [line for line in prose.splitlines() if line.strip()]
    rng = random.Random(0)
    words = ["reverse", "add", "sum", "answer", "result", "copy", "digits", "number", "question", "sort"]
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 9)))
        word = rng.choice(words)
        lines.append(f"{a} + {b} = {a + b}")
        lines.append(f"Reverse {digits}: {digits[::-1]}")
        lines.append(json.dumps({word: a, "result": b, "ok": a > b, "name": word.title()}))
        lines.append(f"{IM_START}user\nWhat is {a} plus {b}?{IM_END}\n{IM_START}assistant\n{a + b}{IM_END}")
    lines += [
        "def add(a: int, b: int) -> int:\n    return a + b",
        "for i in range(10):\n    print(i, i * i)",
        'if __name__ == "__main__":\n    main()',
        '{"role": "system", "content": "You are a helpful assistant."}',
        '{"role": "tool", "content": "{\\"temperature\\": 21}"}',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    return lines


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE that ``assets/tiny_tokenizer.json`` holds (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # Digits are split off one by one before the byte-level regex, so no merge can ever join two digits
    # or a digit with a letter: "123" is always three tokens, which digit tasks rely on.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_training_text(), trainer=trainer)
    return tokenizer


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped tokenizer wrapped for transformers, with ChatML template and pad/eos set."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(_asset_path(TOKENIZER_ASSET)),
        bos_token=None,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(size: str, output: Path, seed: int = 0) -> Path:
    """Write an ordinary HF folder (config, safetensors, tokenizer, chat template) for a tiny model.

    The same ``size``, ``seed`` and TINY_BUILDER_VERSION give byte-identical files.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    name = resolve_tiny_size(size)
    shape = TINY_SIZES[name]
    tokenizer = load_tiny_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Seed a private generator state rather than leaving the caller's global RNG changed for good.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def count_parameters(size: str) -> int:
    """Exact parameter count of a size without allocating weights (tied embedding counted once)."""
    shape = TINY_SIZES[resolve_tiny_size(size)]
    h, i, n = shape.hidden_size, shape.intermediate_size, shape.num_layers
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    return TINY_VOCAB_SIZE * h + n * per_layer + h
