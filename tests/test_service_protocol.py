"""The service's own protobuf schema against the one compiled into the official client, and the codecs
against the client's encoder and decoders (tinker/proto/request_conv.py, response_conv.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tinker", reason="the dev extra installs the tinker client")
from tinker import types  # noqa: E402
from tinker.proto import request_conv, response_conv  # noqa: E402
from tinker.proto import tinker_public_pb2 as theirs  # noqa: E402
from whetstone_trainer.service import proto, protocol  # noqa: E402


def signature(field) -> tuple:  # noqa: ANN001
    oneof = field.containing_oneof.name if field.containing_oneof else None
    message = field.message_type.name if field.message_type else None
    return field.number, field.type, field.is_repeated, oneof, message


@pytest.mark.parametrize("name", [n for n in proto.MESSAGES if "." not in n])
def test_every_message_matches_the_clients_schema(name: str) -> None:
    ours, client = proto.descriptor(name), theirs.DESCRIPTOR.message_types_by_name[name]
    assert {f.name: signature(f) for f in ours.fields} == {f.name: signature(f) for f in client.fields}


def test_a_forward_backward_request_from_the_client_decodes() -> None:
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[3])]
        ),
        loss_fn_inputs={
            "target_tokens": np.array([2, 3, 4]),
            "weights": np.array([0.0, 1.0, -0.5], np.float32),
            "top": np.array([[5, 0], [0, 6], [7, 8]], np.int64),
        },
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum],
            loss_fn="grpo",  # type: ignore[arg-type]
            loss_fn_config={"kl_beta": 0.1, "mode": "x"},
        ),
        model_id="s:train:0",
        seq_id=7,
    )
    body = request_conv.forward_backward_request_to_proto(request).SerializeToString()
    call = protocol.decode_forward_backward(body)
    assert (call.model_id, call.seq_id, call.loss_fn) == ("s:train:0", 7, "grpo")
    assert call.config == {"kl_beta": 0.1, "mode": "x"}
    assert call.data[0].tokens.tolist() == [1, 2, 3]
    assert call.data[0].inputs["weights"].tolist() == [0.0, 1.0, -0.5]
    assert call.data[0].inputs["top"].tolist() == [[5, 0], [0, 6], [7, 8]]


def test_results_decode_in_the_client() -> None:
    outputs = [
        {"logprobs": np.array([-1.0, -2.0], np.float32), "routing": np.array([[1, 2], [3, 0]])},
        {"logprobs": np.array([-3.0], np.float32), "routing": np.array([[0, 1]])},
    ]
    fb = response_conv.deserialize_forward_backward_output(
        protocol.encode_forward_backward_output(outputs, {"loss:sum": 6.0})
    )
    assert fb.metrics == {"loss:sum": 6.0}
    assert fb.loss_fn_outputs[1]["logprobs"].tolist() == [-3.0]
    assert fb.loss_fn_outputs[0]["routing"].shape == [2, 2]
    seqs = [
        protocol.SampledSequence(
            [5, 6], [-0.5, -0.25], True, (np.array([[1, 2], [3, 0]]), np.array([[-0.1, -0.2], [-0.3, -0.4]]))
        )
    ]
    sample = response_conv.deserialize_sample_response(
        protocol.encode_sample_response(seqs, [None, -1.5], (np.array([[0, 1], [2, 3]]), np.zeros((2, 2))))
    )
    seq = sample.sequences[0]
    assert (seq.stop_reason, seq.tokens, seq.logprobs) == ("stop", [5, 6], [-0.5, -0.25])
    assert seq.topk_logprobs_np.token_ids.tolist() == [[1, 2], [3, 0]]
    assert sample.prompt_logprobs[0] is None and math.isclose(sample.prompt_logprobs[1], -1.5)
    assert sample.topk_prompt_logprobs_np.token_ids.tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("body", [b"\xff\xff", b""])
def test_a_broken_body_is_a_user_error(body: bytes) -> None:
    with pytest.raises(protocol.UserError):
        protocol.decode_forward_backward(body)
