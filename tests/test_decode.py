"""sampling/decode.py's step gives the model's own logits for the next token, for each family it takes and
each way it computes a layer (fused q/k/v and gate/up copies, each projection alone, LoRA layers called as
modules), and the sampler's inverse CDF never picks a token of weight 0."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from whetstone_trainer.sampling import decode
from whetstone_trainer.sampling.sampler import inverse_cdf

SIZES = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped queries
    "max_position_embeddings": 64,
}


def _model(family: str) -> Any:
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES, attn_implementation="sdpa"))
    if family == "qwen2":  # q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=False, attn_implementation="sdpa"))
    if family == "qwen3":  # per-head q/k norms, a head size of its own
        return Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16, attn_implementation="sdpa"))
    if family == "llama-rope-llama3":  # scaled rotary angles (from the table of every position)
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
        return LlamaForCausalLM(LlamaConfig(**SIZES, rope_parameters=rope, attn_implementation="sdpa"))
    lora = LoraConfig(
        r=4,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # adapters that change the output
    )
    return get_peft_model(LlamaForCausalLM(LlamaConfig(**SIZES, attn_implementation="sdpa")), lora)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "apart"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "llama-lora", "llama-rope-llama3"])
def test_each_step_gives_the_models_own_next_token_logits(
    family: str, fuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fuse:
        monkeypatch.setattr(decode, "FUSE_LIMIT_BYTES", 0)
    model = _model(family).eval()
    assert decode.supported(model)
    g = torch.Generator().manual_seed(1)
    rows, prompt, steps = 3, 5, 4
    ids = torch.randint(3, 96, (rows, prompt + steps), generator=g)
    mask = torch.ones((rows, prompt), dtype=torch.long)
    mask[0, :2] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = model(input_ids=ids[:, :prompt], attention_mask=mask, position_ids=positions, use_cache=True)
        decoder = decode.Decoder(model, out.past_key_values, mask, prompt + steps)
        layer = decoder.layers[0]
        assert (layer.qkv is not None) == (fuse and family != "llama-lora")
        assert decoder.rope is not None and decoder.rope.shape == (
            prompt + steps,
            2,
            layer.module.self_attn.head_dim,
        )
        full_mask = torch.cat((mask, torch.ones((rows, steps), dtype=torch.long)), 1)
        full_positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        expected = model(input_ids=ids, attention_mask=full_mask, position_ids=full_positions).logits
        running = torch.arange(rows)
        for s in range(steps):
            if s == 2:  # rows 1 finished: the others go on as before, row 0 with its left padding
                running = torch.tensor([2, 0])
                decoder.keep(running)
            logits = decoder.step(ids[running, prompt + s], full_positions[running, prompt + s])
            torch.testing.assert_close(logits, expected[running, prompt + s].float(), atol=2e-5, rtol=1e-5)


def test_the_inverse_cdf_picks_by_cumulative_weight_and_never_a_token_of_weight_zero() -> None:
    g = torch.Generator().manual_seed(0)
    for vocab in (64, 100, 2048):  # a whole number of blocks, a padded last block, many blocks
        weights = torch.rand((256, vocab), generator=g) ** 4
        weights[:, ::3] = 0.0  # filtered tokens (top-k / top-p)
        weights[:, -1] = 0.0
        u = torch.rand(256, generator=g, dtype=torch.float64).float()
        u[:4] = torch.tensor([0.0, 1.0 - 2**-24, 1.0 - 2**-30, 0.5])  # the ends, rounded up to the total
        tokens = inverse_cdf(weights, u)
        assert (weights.gather(1, tokens[:, None]) > 0).all()
        # The same token as a search of the one-level cumulative sum, in float64 (away from ties).
        cdf = weights.double().cumsum(-1)
        target = (u.double()[:, None] * cdf[:, -1:]).clamp_max(cdf[:, -1:] * (1 - 1e-12))
        reference = torch.searchsorted(cdf, target, right=True)[:, 0]
        assert (tokens == reference).float().mean() > 0.99
    # Frequencies follow the weights.
    weights = torch.tensor([[1.0, 0.0, 3.0, 0.0, 4.0]]).expand(20000, 5).contiguous()
    counts = torch.bincount(inverse_cdf(weights, torch.rand(20000, generator=g)), minlength=5)
    assert counts[1] == counts[3] == 0
    torch.testing.assert_close(
        counts.double() / 20000, torch.tensor([0.125, 0, 0.375, 0, 0.5]).double(), atol=0.02, rtol=0
    )
    # Logits that are not numbers (a model that overflowed) are an error that says so, not a token.
    with pytest.raises(ValueError, match="not finite"):
        inverse_cdf(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), torch.tensor([0.5, 0.5]))


def test_a_rotary_embedding_that_rescales_with_the_length_is_computed_each_step() -> None:
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    model = LlamaForCausalLM(LlamaConfig(**SIZES, rope_parameters=rope, attn_implementation="sdpa")).eval()
    mask = torch.ones((2, 3), dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=torch.full((2, 3), 5), attention_mask=mask, use_cache=True)
        decoder = decode.Decoder(model, out.past_key_values, mask, 6)
        assert decoder.rope is None
        reference = model(input_ids=torch.full((2, 4), 5), attention_mask=torch.ones((2, 4))).logits[:, -1]
        logits = decoder.step(torch.full((2,), 5), torch.full((2,), 3))
    torch.testing.assert_close(logits, reference.float(), atol=2e-5, rtol=1e-5)
