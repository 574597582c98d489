"""Routing replay on the tiny MoE model, through the official client: the sampler's expert choices come back
with the samples (record_stability_info=True), and passed as loss_fn_inputs['routing'] they force the same
experts in the training pass, while without them the routing drifts once the weights move."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

tinker = pytest.importorskip("tinker", reason="the dev extra installs the tinker client")
from service_harness import ALICE, Server, client_env, running_server  # noqa: E402
from tinker import types  # noqa: E402

BASE = "whetstone://tiny-moe"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    client_env()
    with running_server(tmp_path_factory.mktemp("serve-moe"), BASE) as s:
        yield s


def routing_of(tc: tinker.TrainingClient, d: types.Datum) -> np.ndarray:
    out = tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]
    return out["routing"].to_numpy()


def test_replay_reproduces_the_sampled_routing_and_without_it_routing_drifts(server: Server) -> None:
    sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    prompt = tok.encode("What is 12 plus 30? The answer is")
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True)
    result = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=12, stop=[], seed=1)
    ).result()
    seq = result.sequences[0]
    # Wire form: experts per token in the top-k fields, [tokens, moe_layers * top_k] (2 layers x top-2 here).
    recorded = np.concatenate(
        [result.topk_prompt_logprobs_np.token_ids, seq.topk_logprobs_np.token_ids[:-1]]
    ).astype(np.int64)
    tokens = prompt + seq.tokens
    assert recorded.shape == (len(tokens) - 1, 4)

    def datum(**extra: np.ndarray) -> types.Datum:
        inputs = {
            "target_tokens": np.array(tokens[1:]),
            "weights": np.ones(len(tokens) - 1, np.float32),
            **extra,
        }
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)

    assert np.array_equal(
        routing_of(tc, datum()), recorded
    )  # same weights: the trainer routes as the sampler did
    other = tok.encode("Reverse 1234567: 7654321 and the rest of the sentence goes on")
    shift = types.Datum(
        model_input=types.ModelInput.from_ints(other[:-1]),
        loss_fn_inputs={"target_tokens": np.array(other[1:]), "weights": np.ones(len(other) - 1, np.float32)},
    )
    drifted = False
    for _ in range(6):
        tc.forward_backward([shift], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=0.2)).result()
        if not np.array_equal(routing_of(tc, datum()), recorded):
            drifted = True
            break
    assert drifted, "training did not move the routing; the test needs a larger update"
    replayed = (
        tc.forward([datum(routing=recorded)], "cross_entropy")
        .result()
        .loss_fn_outputs[0]["routing"]
        .to_numpy()
    )
    assert np.array_equal(replayed, recorded)
    # The replayed pass trains (gradients flow through the router's probabilities of the forced experts).
    loss = tc.forward_backward([datum(routing=recorded)], "cross_entropy").result().metrics["loss:sum"]
    assert np.isfinite(loss)
    with pytest.raises(tinker.RequestFailedError, match="routing"):
        tc.forward([datum(routing=recorded[:, :2])], "cross_entropy").result()
