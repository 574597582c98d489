"""The protobuf messages of the Tinker wire (package `tinker_public`), declared here from their field numbers.

The official client ships the same schema compiled (`tinker/proto/tinker_public_pb2.py`, Apache-2.0). The
service does not import it: the server image must not need the client package, and a schema written out here
is one reviewable table instead of an opaque serialized blob. tests/test_service_protocol.py checks that every
message below matches the client's descriptor field by field (name, number, type, label, oneof), so a client
upgrade that moves a field fails there first.

Only what the service reads or writes is declared; proto3 ignores unknown fields in both directions.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"
_F = descriptor_pb2.FieldDescriptorProto

# (name, number, type, label, type_name or None, oneof name or None)
_Field = tuple[str, int, int, int, "str | None", "str | None"]
OPT, REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
STR, BYTES, BOOL, DOUBLE, FLOAT = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_BOOL, _F.TYPE_DOUBLE, _F.TYPE_FLOAT
I32, I64, U32, U64, MSG, ENUM = (
    _F.TYPE_INT32,
    _F.TYPE_INT64,
    _F.TYPE_UINT32,
    _F.TYPE_UINT64,
    _F.TYPE_MESSAGE,
    _F.TYPE_ENUM,
)

ENUMS: dict[str, list[tuple[str, int]]] = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}

# Map fields are declared as their implicit entry messages, as protoc does.
MESSAGES: dict[str, list[_Field]] = {
    "EncodedTextChunk": [("tokens", 1, BYTES, OPT, None, None)],
    "ImageDimensions": [("width", 1, U32, OPT, None, None), ("height", 2, U32, OPT, None, None)],
    "ImageChunk": [
        ("data", 1, BYTES, OPT, None, None),
        ("format", 2, STR, OPT, None, None),
        ("expected_tokens", 3, I32, OPT, None, "_expected_tokens"),
        ("override_dimensions", 4, MSG, OPT, "ImageDimensions", "_override_dimensions"),
    ],
    "DmelChunk": [("dmel", 1, BYTES, OPT, None, None)],
    "Chunk": [
        ("encoded_text", 1, MSG, OPT, "EncodedTextChunk", "chunk"),
        ("image", 2, MSG, OPT, "ImageChunk", "chunk"),
        ("dmel", 3, MSG, OPT, "DmelChunk", "chunk"),
    ],
    "SparseCsr": [
        ("values", 1, BYTES, OPT, None, None),
        ("crow_indices", 2, BYTES, OPT, None, None),
        ("col_indices", 3, BYTES, OPT, None, None),
    ],
    "Tensor": [
        ("dense", 1, BYTES, OPT, None, "encoding"),
        ("sparse_csr", 2, MSG, OPT, "SparseCsr", "encoding"),
        ("dtype", 3, ENUM, OPT, "DType", None),
        ("shape", 4, I64, REP, None, None),
    ],
    "PromptProvenanceSpan": [
        ("sequence_id", 1, STR, OPT, None, None),
        ("offset", 2, I64, OPT, None, None),
        ("length", 3, I64, OPT, None, None),
    ],
    "SampledProvenanceSpan": [
        ("sequence_id", 1, STR, OPT, None, None),
        ("offset", 2, I64, OPT, None, None),
        ("length", 3, I64, OPT, None, None),
    ],
    "ProvenanceSpan": [
        ("prompt_tokens", 1, MSG, OPT, "PromptProvenanceSpan", "span"),
        ("sampled_tokens", 2, MSG, OPT, "SampledProvenanceSpan", "span"),
    ],
    "Datum.LossFnInputsEntry": [
        ("key", 1, STR, OPT, None, None),
        ("value", 2, MSG, OPT, "Tensor", None),
    ],
    "Datum": [
        ("model_input", 1, MSG, REP, "Chunk", None),
        ("loss_fn_inputs", 2, MSG, REP, "Datum.LossFnInputsEntry", None),
        ("model_input_spans", 3, MSG, REP, "ProvenanceSpan", None),
        ("loss_fn_input_spans", 4, MSG, REP, "ProvenanceSpan", None),
    ],
    "LossConfigValue": [
        ("number", 1, DOUBLE, OPT, None, "value"),
        ("text", 2, STR, OPT, None, "value"),
    ],
    "ForwardBackwardRequest.LossFnConfigEntry": [
        ("key", 1, STR, OPT, None, None),
        ("value", 2, DOUBLE, OPT, None, None),
    ],
    "ForwardBackwardRequest.LossFnConfigV2Entry": [
        ("key", 1, STR, OPT, None, None),
        ("value", 2, MSG, OPT, "LossConfigValue", None),
    ],
    "ForwardBackwardRequest": [
        ("model_id", 1, STR, OPT, None, None),
        ("seq_id", 2, I32, OPT, None, None),
        ("data", 3, MSG, REP, "Datum", None),
        ("loss_fn", 4, STR, OPT, None, None),
        ("loss_fn_config", 5, MSG, REP, "ForwardBackwardRequest.LossFnConfigEntry", None),
        ("forward_only", 6, BOOL, OPT, None, None),
        ("loss_fn_config_v2", 7, MSG, REP, "ForwardBackwardRequest.LossFnConfigV2Entry", None),
    ],
    "BatchedTensor": [
        ("data", 1, BYTES, OPT, None, None),
        ("offsets", 2, BYTES, OPT, None, None),
        ("dtype", 3, ENUM, OPT, "DType", None),
        ("trailing_shape", 4, I64, REP, None, None),
    ],
    "ArrayRecord.FieldsEntry": [
        ("key", 1, STR, OPT, None, None),
        ("value", 2, MSG, OPT, "BatchedTensor", None),
    ],
    "ArrayRecord": [
        ("type_tag", 1, STR, OPT, None, None),
        ("fields", 2, MSG, REP, "ArrayRecord.FieldsEntry", None),
        ("num_datums", 3, I64, OPT, None, None),
    ],
    "ForwardBackwardOutput.MetricsEntry": [
        ("key", 1, STR, OPT, None, None),
        ("value", 2, DOUBLE, OPT, None, None),
    ],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, STR, OPT, None, None),
        ("loss_fn_outputs", 2, MSG, REP, "ArrayRecord", None),
        ("metrics", 3, MSG, REP, "ForwardBackwardOutput.MetricsEntry", None),
    ],
    "TopkLogprobs": [
        ("token_ids", 1, BYTES, OPT, None, None),
        ("logprobs", 2, BYTES, OPT, None, None),
        ("k", 3, U32, OPT, None, None),
        ("length", 4, U32, OPT, None, None),
    ],
    "SampledSequence": [
        ("stop_reason", 1, ENUM, OPT, "StopReason", None),
        ("tokens", 2, BYTES, OPT, None, None),
        ("logprobs", 3, BYTES, OPT, None, "_logprobs"),
        ("topk_sampled_logprobs", 4, MSG, OPT, "TopkLogprobs", "_topk_sampled_logprobs"),
    ],
    "PromptAltTokens": [
        ("tokens", 1, MSG, OPT, "Tensor", None),
        ("logprobs", 2, MSG, OPT, "Tensor", None),
    ],
    "SampleResponse": [
        ("sequences", 1, MSG, REP, "SampledSequence", None),
        ("prompt_logprobs", 2, BYTES, OPT, None, "_prompt_logprobs"),
        ("topk_prompt_logprobs", 3, MSG, OPT, "TopkLogprobs", "_topk_prompt_logprobs"),
        ("prompt_cache_hit_tokens", 4, I32, OPT, None, None),
        ("target_prompt_logprobs", 5, MSG, OPT, "Tensor", "_target_prompt_logprobs"),
        ("prompt_alt_tokens", 6, MSG, OPT, "PromptAltTokens", "_prompt_alt_tokens"),
    ],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(
        name="whetstone_tinker_public.proto", package=PACKAGE, syntax="proto3"
    )
    for enum_name, values in ENUMS.items():
        enum = fd.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    top: dict[str, descriptor_pb2.DescriptorProto] = {}
    # Top-level messages first, then the map entries nested in them.
    for name, fields in sorted(MESSAGES.items(), key=lambda item: "." in item[0]):
        if "." in name:
            parent_name, entry = name.split(".")
            msg = top[parent_name].nested_type.add(name=entry)
            msg.options.map_entry = True
        else:
            msg = fd.message_type.add(name=name)
            top[name] = msg
        oneofs: list[str] = []
        for field_name, number, ftype, label, type_name, oneof in fields:
            field = msg.field.add(name=field_name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".{PACKAGE}.{type_name}"
            if oneof:  # proto3 `optional` fields are synthetic oneofs named "_<field>"
                if oneof not in oneofs:
                    oneofs.append(oneof)
                    msg.oneof_decl.add(name=oneof)
                field.oneof_index = oneofs.index(oneof)
                if oneof == f"_{field_name}":
                    field.proto3_optional = True
    return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def message_class(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def descriptor(name: str) -> Any:
    return _POOL.FindMessageTypeByName(f"{PACKAGE}.{name}")


ForwardBackwardRequest = message_class("ForwardBackwardRequest")
ForwardBackwardOutput = message_class("ForwardBackwardOutput")
SampleResponse = message_class("SampleResponse")
TopkLogprobs = message_class("TopkLogprobs")
Tensor = message_class("Tensor")

DTYPE_FLOAT32 = 1
DTYPE_INT64 = 2
DTYPE_INT32 = 3
DTYPE_BFLOAT16 = 4
STOP_REASON_STOP = 0
STOP_REASON_LENGTH = 1
