"""The training service driven by the official `tinker` client (0.38.0 from PyPI, unmodified) against
`whetstone serve` started as a subprocess on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker", reason="the dev extra installs the tinker client")
from service_harness import ALICE, BOB, Server, client_env, running_server  # noqa: E402
from tinker import types  # noqa: E402
from whetstone_trainer.methods import losses  # noqa: E402

BASE = "whetstone://tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    client_env()
    with running_server(tmp_path_factory.mktemp("serve"), BASE) as s:
        yield s


def service(server: Server, key: str = ALICE) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=key)


def datum(tokens: list[int], **extra: np.ndarray) -> types.Datum:
    n = len(tokens) - 1
    inputs = {"target_tokens": np.array(tokens[1:], dtype=np.int64), "weights": np.ones(n, dtype=np.float32)}
    inputs.update(extra)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def task(tc: tinker.TrainingClient) -> list[types.Datum]:
    tok = tc.get_tokenizer()  # a local folder from get_info: loads with no hub
    return [datum(tok.encode(f"Reverse {s}: {s[::-1]}")) for s in ("1234", "9021", "5567", "3048")]


def step(tc: tinker.TrainingClient, data: list[types.Datum], lr: float = 1e-2) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=lr))  # submitted before the result, as the client does
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return loss


def raw(
    server: Server,
    path: str,
    body: object,
    key: str = ALICE,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.url}{path}",
        data=data if data is not None else json.dumps(body).encode(),
        method="POST",
        headers={"X-API-Key": key, "Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def held_models(server: Server) -> dict[str, int]:
    """Model id -> optimizer steps, from the service's own status (what the operator reads)."""
    with urllib.request.urlopen(f"{server.url}/whetstone/status", timeout=10) as r:
        return {m["modelId"]: m["step"] for m in json.loads(r.read())["models"]}


def test_supervised_loss_falls_and_state_round_trips_bit_identically(server: Server) -> None:
    sc = service(server)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=0).result()
    data = task(tc)
    losses_ = [step(tc, data) for _ in range(12)]
    assert losses_[-1] < 0.5 * losses_[0], losses_

    path = tc.save_state("after-12").result().path
    assert path == f"tinker://{tc.model_id}/weights/after-12"
    twin = sc.create_training_client_from_state_with_optimizer(path).result()
    assert twin.model_id != tc.model_id
    # The next step of the original and of the copy: same loss, then bit-identical weights.
    assert step(tc, data) == step(twin, data)
    a = tc.forward(data, "cross_entropy").result().loss_fn_outputs
    b = twin.forward(data, "cross_entropy").result().loss_fn_outputs
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x["logprobs"].to_numpy(), y["logprobs"].to_numpy())

    rest = sc.create_rest_client()
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [path]
    assert rest.get_training_run(tc.model_id).result().lora_rank == 8


def test_full_parameter_client_trains_and_samples(server: Server) -> None:
    """lora_config.rank == 0: Whetstone's full-parameter extension (its own copy of every weight)."""
    sc = service(server)
    tc = sc.create_lora_training_client(base_model=BASE, rank=0).result()
    assert tc.get_info().is_lora is False
    data = task(tc)
    losses_ = [step(tc, data, lr=3e-3) for _ in range(4)]
    assert losses_[-1] < losses_[0], losses_
    sampler = tc.save_weights_and_get_sampling_client()
    target = types.ModelInput.from_ints(
        [*data[0].model_input.to_ints(), int(data[0].loss_fn_inputs["target_tokens"].data[-1])]
    )
    trained = tc.forward(data[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    sampled = np.array(sampler.compute_logprobs(target).result()[1:], dtype=np.float32)
    np.testing.assert_allclose(sampled, trained, atol=1e-5)


def test_forward_backward_custom_matches_the_builtin_loss(server: Server) -> None:
    sc = service(server)
    builtin = sc.create_lora_training_client(base_model=BASE, rank=4, seed=3).result()
    custom = sc.create_lora_training_client(base_model=BASE, rank=4, seed=3).result()
    data = task(builtin)
    weights = [np.linspace(-0.5, 2.0, len(d.loss_fn_inputs["weights"].data)).astype(np.float32) for d in data]
    data = [
        datum([*d.model_input.to_ints(), int(d.loss_fn_inputs["target_tokens"].data[-1])], weights=w)
        for d, w in zip(data, weights, strict=True)
    ]

    def weighted_nll(
        batch: list[types.Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum(
            losses.cross_entropy(lp, torch.tensor(d.loss_fn_inputs["weights"].data))
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {}

    ref = builtin.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    got = custom.forward_backward_custom(data, weighted_nll).result().metrics["loss:sum"]
    assert got == pytest.approx(ref, rel=1e-5)
    for tc in (builtin, custom):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    a = builtin.forward(data, "cross_entropy").result().loss_fn_outputs
    b = custom.forward(data, "cross_entropy").result().loss_fn_outputs
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_every_builtin_and_rft_loss_matches_losses_py(server: Server) -> None:
    tc = service(server).create_lora_training_client(base_model=BASE, rank=4, seed=1).result()
    tokens = tc.get_tokenizer().encode("What is 2 plus 3? 5")
    n = len(tokens) - 1
    rng = np.random.default_rng(0)
    q = (-rng.random(n) * 3).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    mask = (np.arange(n) >= n // 2).astype(np.float32)
    d = datum(tokens, logprobs=q, advantages=adv, sequence_ratio_mask=mask)
    lp = torch.tensor(tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy())
    Q, A, M = torch.tensor(q), torch.tensor(adv), torch.tensor(mask)
    expected = {
        ("importance_sampling", ()): losses.importance_sampling_terms(lp, Q, A).sum(),
        ("ppo", (("clip_low_threshold", 0.9), ("clip_high_threshold", 1.1))): losses.ppo_terms(
            lp, Q, A, 0.9, 1.1
        ).sum(),
        ("cispo", ()): losses.cispo_terms(lp, Q, A).sum(),
        ("dro", (("beta", 0.05),)): losses.dro_terms(lp, Q, A, 0.05).sum(),
        ("gspo", ()): losses.gspo_token_terms(lp[None], Q[None], A[None], M[None], 0.8, 1.2).sum(),
        ("grpo", ()): losses.aggregate(losses.ppo_terms(lp, Q, A)[None], M[None], "token-mean"),
        ("dapo", ()): losses.aggregate(losses.ppo_terms(lp, Q, A, 0.8, 1.28)[None], M[None], "token-mean"),
        ("gspo-token", ()): losses.aggregate(
            losses.gspo_token_terms(lp[None], Q[None], A[None], M[None], 1 - 3e-4, 1 + 4e-4),
            M[None],
            "seq-mean-token-mean",
        ),
    }
    for (name, config), value in expected.items():
        # Service-side names outside the client's Literal pass through: the client sends loss_fn as a string.
        got = tc.forward([d], name, dict(config) or None).result().metrics["loss:sum"]  # type: ignore[arg-type]
        assert got == pytest.approx(float(value), rel=1e-4, abs=1e-5), name
    with pytest.raises(tinker.RequestFailedError, match="beta"):
        tc.forward([d], "dro").result()


def test_wrong_key_is_refused(server: Server) -> None:
    with pytest.raises(Exception, match="401|API key"):
        tinker.ServiceClient(base_url=server.url, api_key="tml-not-a-key").create_lora_training_client(
            base_model=BASE
        ).result()
    status, body = raw(server, "/api/v1/create_session", {}, key="tml-not-a-key")
    assert status == 401 and "API key" in body["error"]


def test_one_tenant_cannot_reach_anothers_models_and_checkpoints(server: Server) -> None:
    alice = service(server, ALICE)
    tc = alice.create_lora_training_client(base_model=BASE, rank=2).result()
    state = tc.save_state("private").result().path
    sampler = tc.save_weights_for_sampler("private-sampler").result().path
    bob = service(server, BOB)
    with pytest.raises(Exception, match="404|not found"):
        bob.create_training_client_from_state(state).result()
    with pytest.raises(Exception, match="404|not found"):
        bob.create_rest_client().list_checkpoints(tc.model_id).result()
    with pytest.raises(Exception, match="404|not found"):
        bob.create_sampling_client(model_path=sampler).result()
    status, _ = raw(server, "/api/v1/get_info", {"model_id": tc.model_id}, key=BOB)
    assert status == 404
    # Alice still sees hers.
    assert alice.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints


def test_a_resent_request_has_one_effect(server: Server) -> None:
    _, session = raw(server, "/api/v1/create_session", {"tags": [], "sdk_version": "0.38.0"})
    sid = session["session_id"]
    _, created = raw(
        server,
        "/api/v1/create_model",
        {"session_id": sid, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 2}},
    )
    model_id = f"{sid}:train:0"
    body = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 0.01}}
    key = {"X-Idempotency-Key": "stainless-python-retry-1"}
    first = raw(server, "/api/v1/optim_step", body, headers=key)[1]
    again = raw(server, "/api/v1/optim_step", body, headers=key)[1]
    same_seq = raw(server, "/api/v1/optim_step", body)[1]  # no key, but the same (model, seq_id)
    assert first["request_id"] == again["request_id"] == same_seq["request_id"]
    raw(server, "/api/v1/retrieve_future", {"request_id": first["request_id"]})
    assert held_models(server)[model_id] == 1  # one optimizer step


def test_the_service_survives_malformed_requests(server: Server) -> None:
    request = urllib.request.Request(
        f"{server.url}/api/v1/create_session", data=b"{not json", method="POST", headers={"X-API-Key": ALICE}
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=10)
    assert bad.value.code == 400 and "JSON" in json.loads(bad.value.read())["error"]
    _, fut = raw(
        server,
        "/api/v1/forward_backward",
        None,
        data=b"\xff\x00garbage",
        headers={"Content-Type": "application/x-protobuf"},
    )
    _, result = raw(server, "/api/v1/retrieve_future", {"request_id": fut["request_id"]})
    assert result["category"] == "user" and "protobuf" in result["error"]

    tc = service(server).create_lora_training_client(base_model=BASE, rank=2).result()
    tokens = tc.get_tokenizer().encode("hello there")
    with pytest.raises(tinker.RequestFailedError, match="unknown loss_fn"):
        tc.forward([datum(tokens)], "no_such_loss").result()  # type: ignore[arg-type]
    tc = service(server).create_lora_training_client(base_model=BASE, rank=2).result()
    with pytest.raises(tinker.RequestFailedError, match="vocabulary"):
        tc.forward([datum([1, 2, 10**6])], "cross_entropy").result()
    # ... and keeps serving the others.
    tc = service(server).create_lora_training_client(base_model=BASE, rank=2).result()
    assert tc.forward([datum(tokens)], "cross_entropy").result().metrics["loss:sum"] > 0
    assert server.alive()


def test_checkpoints_outlive_the_session(server: Server) -> None:
    sc = service(server)
    tc = sc.create_lora_training_client(base_model=BASE, rank=2).result()
    path = tc.save_state("kept").result().path
    sc.close("success").result()  # the session ends: its training clients are released, its checkpoints stay
    assert raw(server, "/api/v1/get_info", {"model_id": tc.model_id})[0] == 404
    again = service(server).create_training_client_from_state(path).result()
    assert again.get_info().model_data.model_name == BASE


def test_rl_loop_with_importance_sampling_raises_the_reward(server: Server) -> None:
    """sample -> score -> importance_sampling, the cookbook's loop in miniature: the reward is the share of
    sampled tokens below id 256 (the byte tokens, ~1/8 of the vocabulary at the start)."""
    sc = service(server)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=0).result()
    prompt = types.ModelInput.from_ints(tc.get_tokenizer().encode("Pick:"))
    rewards = []
    for step_index in range(16):
        sampler = tc.save_weights_and_get_sampling_client()
        params = types.SamplingParams(max_tokens=4, temperature=1.0, stop=[], seed=step_index)
        result = sampler.sample(prompt, 16, params).result()
        scores = np.array([np.mean(np.array(s.tokens) < 256) for s in result.sequences])
        rewards.append(float(scores.mean()))
        advantages = (scores - scores.mean()) / (scores.std() + 1e-6)  # GRPO's group normalisation
        data = []
        for seq, adv in zip(result.sequences, advantages, strict=True):
            tokens = prompt.to_ints() + seq.tokens
            n, p = len(tokens) - 1, len(prompt.to_ints()) - 1
            q = np.zeros(n, np.float32)
            q[p:] = seq.logprobs
            a = np.zeros(n, np.float32)
            a[p:] = adv
            data.append(datum(tokens, logprobs=q, advantages=a))
        tc.forward_backward(data, "importance_sampling").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.15, rewards


def test_sampling_follows_saved_weights_and_keeps_older_snapshots(server: Server) -> None:
    sc = service(server)
    tc = sc.create_lora_training_client(base_model=BASE, rank=8, seed=0).result()
    data = task(tc)
    target = types.ModelInput.from_ints(
        [*data[0].model_input.to_ints(), int(data[0].loss_fn_inputs["target_tokens"].data[-1])]
    )

    def trainer_view() -> np.ndarray:
        return tc.forward(data[:1], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    def sampler_view(sampler: tinker.SamplingClient) -> np.ndarray:
        return np.array(sampler.compute_logprobs(target).result()[1:], dtype=np.float32)

    before = tc.save_weights_and_get_sampling_client()
    named = tc.save_weights_for_sampler("before").result().path
    np.testing.assert_allclose(sampler_view(before), trainer_view(), atol=1e-5)
    old = trainer_view()
    for _ in range(4):
        step(tc, data)
    after = tc.save_weights_and_get_sampling_client()  # hotload: no restart, the next sample sees it
    new = trainer_view()
    assert not np.allclose(old, new, atol=1e-3)
    np.testing.assert_allclose(sampler_view(after), new, atol=1e-5)
    np.testing.assert_allclose(sampler_view(before), old, atol=1e-5)  # the older snapshot is still there
    by_path = sc.create_sampling_client(model_path=named).result()
    np.testing.assert_allclose(sampler_view(by_path), old, atol=1e-5)
    sc.create_rest_client().delete_checkpoint_from_tinker_path(named).result()
    with pytest.raises(Exception, match="404|not found"):
        sc.create_sampling_client(model_path=named).result().compute_logprobs(target).result()


def test_sampling_n_seeds_stops_and_logprobs(server: Server) -> None:
    sc = service(server)
    sampler = sc.create_sampling_client(base_model=BASE).result()
    # SamplingClient.get_tokenizer loads by base-model name from the hub; a training client's is a folder.
    tok = sc.create_lora_training_client(base_model=BASE, rank=2).result().get_tokenizer()
    prompt = types.ModelInput.from_ints(tok.encode("Reverse 123:"))
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])
    a = sampler.sample(prompt, 4, params).result()
    b = sampler.sample(prompt, 4, params).result()
    assert len(a.sequences) == 4 and len({s.sequence_id for s in a.sequences}) == 4
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]  # same seed, same samples
    assert all(len(s.tokens) == 6 and s.stop_reason == "length" and len(s.logprobs) == 6 for s in a.sequences)
    # A stop token ends the sequence and stays in it.
    first = sampler.sample(prompt, 1, params).result().sequences[0].tokens
    stop_at = first[2]
    stopped = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[stop_at])
    ).result()
    seq = stopped.sequences[0]
    assert (
        seq.stop_reason == "stop"
        and seq.tokens[-1] == stop_at
        and seq.tokens == first[: first.index(stop_at) + 1]
    )


def test_limits_and_idle_release_keep_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> None:
    client_env()
    args = ("--idle-timeout-seconds", "2", "--max-training-clients", "1")
    with running_server(tmp_path_factory.mktemp("limits"), BASE, *args) as small:
        sc = service(small)
        tc = sc.create_lora_training_client(base_model=BASE, rank=2).result()
        with pytest.raises(tinker.RequestFailedError, match="maximum of 1 training clients"):
            sc.create_lora_training_client(base_model=BASE, rank=2).result()
        path = tc.save_state("before-idle").result().path
        deadline = time.monotonic() + 30
        while tc.model_id in held_models(small):  # /whetstone/status is not a request of the session
            assert time.monotonic() < deadline, "the idle session was not released"
            time.sleep(0.5)
        assert raw(small, "/api/v1/get_info", {"model_id": tc.model_id})[0] == 404
        assert "idle" in small.log_text()
        again = service(small).create_training_client_from_state(path).result()
        assert again.model_id != tc.model_id
