"""What keeps a step's activation memory down reaches the model and changes memory, not the numbers:
hyperparameters.gradientCheckpointing (default on with LoRA, off with full-parameter) turns on the layers'
checkpointing, which keeps fewer tensors for the backward and gives the same loss and gradients; and
loop.target_logprobs, which runs the output head a chunk of tokens at a time, equals one whole head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import valid_job
from whetstone_api import FineTuneJob
from whetstone_trainer import loop
from whetstone_trainer.data.formats import TokenizedExample
from whetstone_trainer.data.packing import Row, collate
from whetstone_trainer.methods import losses
from whetstone_trainer.models.activations import is_gradient_checkpointing
from whetstone_trainer.models.sources import materialise, parse_model_uri


def _spec(tuning: dict[str, Any], **hyper: Any) -> Any:
    doc = valid_job()
    doc["spec"].pop("fullParameter")
    doc["spec"].update(tuning)
    doc["spec"]["hyperparameters"] = {"seed": 3, **hyper}
    return FineTuneJob.model_validate(doc).spec


def _trainee(spec: Any) -> loop.Trainee:
    folder = materialise(parse_model_uri(spec.base_model.uri))
    return loop.prepare_trainee(spec, loop.start(spec), folder, total_steps=1, micro=2)


def _batch() -> Any:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (40, 29):  # prompts (weight 0) then answers, of two lengths: padding too
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        rows.append(Row((TokenizedExample(ids, [0.0] * (n // 2) + [1.0] * (n - n // 2)),)))
    return collate(rows, pad_id=0)


LORA = {"lora": {"rank": 4}}
FULL = {"fullParameter": {}}


@pytest.mark.parametrize(
    ("tuning", "setting", "expected"),
    [(LORA, None, True), (FULL, None, False), (LORA, False, False), (FULL, True, True)],
    ids=["lora-default", "full-default", "lora-off", "full-on"],
)
def test_the_setting_reaches_the_model(tuning: dict[str, Any], setting: bool | None, expected: bool) -> None:
    hyper = {} if setting is None else {"gradientCheckpointing": setting}
    spec = _spec(tuning, **hyper)
    assert spec.gradient_checkpointing is expected
    assert is_gradient_checkpointing(_trainee(spec).model) is expected


def _step(tuning: dict[str, Any], checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the elements the forward kept for the backward, for one micro-batch."""
    trainee = _trainee(_spec(tuning, gradientCheckpointing=checkpointing))
    kept = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += x.numel()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = loop.token_nll_sum(trainee.model, _batch(), torch.device("cpu"))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainee.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, kept


@pytest.mark.parametrize("tuning", [LORA, FULL], ids=["lora", "full-parameter"])
def test_checkpointing_keeps_less_for_the_backward_and_changes_nothing_else(tuning: dict[str, Any]) -> None:
    loss, grads, kept = _step(tuning, checkpointing=False)
    loss_c, grads_c, kept_c = _step(tuning, checkpointing=True)
    assert kept_c < kept / 2, (kept_c, kept)  # layer inputs only, instead of everything each layer made
    assert loss_c == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_c.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_target_logprobs_in_chunks_equal_the_whole_head(monkeypatch: pytest.MonkeyPatch) -> None:
    trainee = _trainee(_spec(FULL))
    model, batch = trainee.model, _batch()
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    keep = batch.weights[:, 1:] != 0
    whole = torch.log_softmax(logits[:, :-1][keep].float(), -1).gather(
        -1, batch.input_ids[:, 1:][keep][:, None]
    )
    whole[:, 0].sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(losses, "LOGIT_CHUNK_ELEMENTS", 7 * vocab)  # 35 targets: 5 chunks of 7
    t = loop.target_logprobs(model, batch, torch.device("cpu"), with_entropy=True)
    torch.testing.assert_close(t.logprobs, whole[:, 0].detach(), rtol=1e-5, atol=1e-5)
    assert t.entropy is not None and t.entropy.shape == t.logprobs.shape
    t.logprobs.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # the head is the model's own again afterwards
    assert model.get_output_embeddings()(torch.zeros(1, model.config.hidden_size)).shape[-1] == vocab


def test_the_api_field_is_optional_and_typed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gradientCheckpointing"):
        _spec(LORA, gradientCheckpointing="sometimes")
