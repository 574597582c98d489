"""The sampler shared by RFT rollouts, the before/after samples of `whetstone run` and the training service.

    from whetstone_trainer.sampling import SamplingParams, sample, prompt_logprobs

    completions = sample(model, [prompt_ids, ...], SamplingParams(max_tokens=64, temperature=1.0), n=8)
    completions[i][j].tokens / .logprobs / .finish_reason   # prompt i, sample j

Batched over prompts × n with a KV cache and left padding; finished rows leave the batch. See sampler.py.
"""

from .sampler import Completion, FinishReason, SamplingParams, default_stop_token_ids, prompt_logprobs, sample

__all__ = [
    "Completion",
    "FinishReason",
    "SamplingParams",
    "default_stop_token_ids",
    "prompt_logprobs",
    "sample",
]
