"""The Tinker wire as the service reads and writes it: JSON request bodies (pydantic, extra fields ignored,
so a newer client's additions pass), the protobuf forward/backward request and the protobuf results, the
identifier formats the client derives itself, and the error the client raises cleanly.

Contract: shared/reference/tinker-protocol.md (checked against the `tinker` 0.38.0 client).
No torch here: decoded inputs are numpy arrays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import proto

SDK_VERSION_TESTED = "0.38.0"
ErrorCategory = Literal["user", "server", "unknown"]


class UserError(ValueError):
    """A request the client got wrong: reported as {"error", "category": "user"} (the client raises
    RequestFailedError), never as a traceback."""


class NotFound(LookupError):
    """A model, sampler, checkpoint or future this API key does not own (or that does not exist): 404."""


# --- identifiers --------

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TINKER_SCHEME = "tinker://"
CHECKPOINT_KINDS = {"weights": "training", "sampler_weights": "sampler"}


def training_model_id(session_id: str, model_seq_id: int) -> str:
    """`session:train:N`: the client derives this itself for create-via-load, so the format is fixed."""
    return f"{session_id}:train:{model_seq_id}"


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def session_of(model_or_sampler_id: str) -> str:
    return model_or_sampler_id.split(":", 1)[0]


@dataclass(frozen=True)
class TinkerPath:
    """tinker://<training run>/<weights|sampler_weights>/<name>."""

    run_id: str
    kind: Literal["weights", "sampler_weights"]
    name: str

    def __str__(self) -> str:
        return f"{TINKER_SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


def parse_tinker_path(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith(TINKER_SCHEME):
        raise UserError(
            f"{path!r} is not a tinker:// path (tinker://RUN/weights/NAME or .../sampler_weights/NAME)"
        )
    parts = path[len(TINKER_SCHEME) :].split("/")
    if len(parts) != 3 or parts[1] not in CHECKPOINT_KINDS or not NAME.match(parts[2]) or not parts[0]:
        raise UserError(
            f"{path!r} is not a tinker:// path (tinker://RUN/weights/NAME or .../sampler_weights/NAME)"
        )
    return TinkerPath(parts[0], parts[1], parts[2])  # type: ignore[arg-type]


def check_name(name: str, what: str = "checkpoint name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(
            f"{what} {name!r} is not allowed: 1-128 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


# --- JSON requests --------


class Request(BaseModel):
    # Unknown fields pass: a newer client may add some; the ones that matter are declared.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSession(Request):
    tags: list[str] = Field(default_factory=list, max_length=64)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionRef(Request):
    session_id: str


class LoraConfig(Request):
    rank: int = Field(default=32, ge=0, le=1024)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfig(Request):
    type: str = "adamw"


class CreateModel(Request):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)


class ModelRef(Request):
    model_id: str


class AdamParams(Request):
    learning_rate: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class OptimStep(Request):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(Request):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None


class SaveWeightsForSampler(Request):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: str = "snapshot"
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None


class LoadWeights(Request):
    path: str
    optimizer: bool = False
    # create-via-load
    session_id: str | None = None
    model_seq_id: int | None = Field(default=None, ge=0)
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    # legacy load_state on an existing model
    model_id: str | None = None
    seq_id: int | None = None


class CreateSamplingSession(Request):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class EncodedText(Request):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class ModelInput(Request):
    chunks: list[dict[str, Any]] = Field(default_factory=list)

    def tokens(self) -> list[int]:
        """The prompt's tokens: text chunks concatenated in order (renderers emit many)."""
        out: list[int] = []
        for i, chunk in enumerate(self.chunks):
            kind = chunk.get("type", "encoded_text")
            if kind != "encoded_text":
                raise UserError(
                    f"prompt.chunks[{i}] is a {kind!r} chunk: this service takes text tokens only"
                )
            tokens = chunk.get("tokens")
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens
            ):
                raise UserError(f"prompt.chunks[{i}].tokens must be a list of integers")
            out.extend(tokens)
        return out


class SamplingParams(Request):
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(Request):
    num_samples: int = Field(default=1, ge=1)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0)
    topk_sample_logprobs: int = Field(default=0, ge=0)
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = Field(default=0, ge=0)
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None


class RetrieveFuture(Request):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfo(Request):
    tinker_path: str


def parse_json(model: type[Request], body: Any) -> Any:
    """Validate a JSON body; a UserError names the first bad field."""
    if not isinstance(body, dict):
        raise UserError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise UserError(f"invalid request field {where}: {first['msg']}") from None


# --- forward/backward (protobuf in, protobuf out) --------

_NP_OF_DTYPE = {proto.DTYPE_FLOAT32: np.float32, proto.DTYPE_INT64: np.int64, proto.DTYPE_INT32: np.int32}


@dataclass
class Datum:
    """One training example: input tokens and loss inputs, each with leading dimension len(tokens)."""

    tokens: np.ndarray  # int64 [N]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    config: dict[str, float | str]
    forward_only: bool
    data: list[Datum]


def _tensor(msg: Any, where: str) -> np.ndarray:
    np_dtype = _NP_OF_DTYPE.get(msg.dtype)
    if np_dtype is None:
        raise UserError(f"{where}: unsupported dtype {msg.dtype} (float32 or int64)")
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise UserError(f"{where}: negative dimension in shape {shape}")
    kind = msg.WhichOneof("encoding")
    if kind == "sparse_csr":
        if len(shape) != 2:
            raise UserError(f"{where}: a sparse CSR tensor must be 2-D, shape {shape}")
        values = np.frombuffer(msg.sparse_csr.values, dtype=np_dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        rows, cols = shape
        if len(crow) != rows + 1 or len(col) != len(values) or (len(crow) and crow[-1] != len(values)):
            raise UserError(f"{where}: inconsistent sparse CSR indices")
        if len(col) and (col.min() < 0 or col.max() >= cols) or np.any(np.diff(crow) < 0):
            raise UserError(f"{where}: sparse CSR index out of range")
        dense = np.zeros((rows, cols), dtype=np_dtype)  # densified with pad 0 (the client's convention)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, col] = values
        return dense
    data = np.frombuffer(msg.dense, dtype=np_dtype)
    if shape:
        if math.prod(shape) != data.size:
            raise UserError(f"{where}: {data.size} values do not fill shape {shape}")
        return data.reshape(shape)
    return data


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg = proto.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception:
        raise UserError("the forward_backward body is not a valid ForwardBackwardRequest protobuf") from None
    if not msg.model_id:
        raise UserError("forward_backward: model_id is missing")
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    data = []
    for i, d in enumerate(msg.data):
        tokens: list[np.ndarray] = []
        for j, chunk in enumerate(d.model_input):
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise UserError(f"data[{i}].model_input[{j}]: only text chunks are supported")
            tokens.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32))
        ids = np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, dtype=np.int64)
        if ids.size == 0:
            raise UserError(f"data[{i}]: the model input is empty")
        inputs = {
            name: _tensor(t, f"data[{i}].loss_fn_inputs[{name!r}]") for name, t in d.loss_fn_inputs.items()
        }
        for name, arr in inputs.items():
            if arr.ndim == 0 or arr.shape[0] != ids.size:
                raise UserError(
                    f"data[{i}].loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; its first dimension "
                    f"must be the input length {ids.size} (position i predicts target_tokens[i])"
                )
        data.append(Datum(ids, inputs))
    return ForwardBackwardCall(
        msg.model_id, int(msg.seq_id), msg.loss_fn, config, bool(msg.forward_only), data
    )


def encode_forward_backward_output(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """One ArrayRecord for all datums: each field concatenated with byte offsets and its trailing shape."""
    msg = proto.ForwardBackwardOutput()
    msg.loss_fn_output_type = "ArrayRecord"
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    record = msg.loss_fn_outputs.add()
    record.num_datums = len(outputs)
    names = list(outputs[0]) if outputs else []
    for name in names:
        arrays = [np.ascontiguousarray(o[name]) for o in outputs]
        is_int = np.issubdtype(arrays[0].dtype, np.integer)
        arrays = [a.astype(np.int64 if is_int else np.float32, copy=False) for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([a.nbytes for a in arrays])
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = offsets.tobytes()
        bt.dtype = proto.DTYPE_INT64 if is_int else proto.DTYPE_FLOAT32
        bt.trailing_shape.extend(list(arrays[0].shape[1:]))
    return msg.SerializeToString()


# --- sampling result --------


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop: bool  # True: a stop token or string (or EOS) ended it; False: max_tokens
    topk: tuple[np.ndarray, np.ndarray] | None = None  # (int32 ids [T, K], float32 logprobs [T, K])


def _topk(msg: Any, ids: np.ndarray, logprobs: np.ndarray) -> None:
    msg.token_ids = np.ascontiguousarray(ids, dtype=np.int32).tobytes()
    msg.logprobs = np.ascontiguousarray(logprobs, dtype=np.float32).tobytes()
    msg.length, msg.k = int(ids.shape[0]), int(ids.shape[1]) if ids.ndim == 2 else 0


def encode_sample_response(
    sequences: list[SampledSequence],
    prompt_logprobs: list[float | None] | None,
    prompt_topk: tuple[np.ndarray, np.ndarray] | None = None,
) -> bytes:
    msg = proto.SampleResponse()
    for s in sequences:
        seq = msg.sequences.add()
        seq.stop_reason = proto.STOP_REASON_STOP if s.stop else proto.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype=np.float32).tobytes()
        if s.topk is not None:
            _topk(seq.topk_sampled_logprobs, *s.topk)
    if prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    if prompt_topk is not None:
        _topk(msg.topk_prompt_logprobs, *prompt_topk)
    return msg.SerializeToString()


def error_body(message: str, category: ErrorCategory = "user") -> dict[str, str]:
    """A failed operation: HTTP 200 with this body makes the client raise RequestFailedError(category)."""
    return {"error": message, "category": category}
