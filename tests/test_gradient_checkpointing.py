"""``ModelSpec.gradient_checkpointing`` is on for every trained model (SFT, RM, PPO policy and critic), leaves
losses and gradients unchanged, and sampling still uses the KV cache."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.hf import LoraSpec, ModelSpec
from lit_rlhf.hf.generation import SamplingConfig, sample_responses
from lit_rlhf.hf.loading import unwrap_peft
from lit_rlhf.models.ppo import PPOConfig, PPOModule
from lit_rlhf.models.reward import RewardModule
from lit_rlhf.models.sft import SFTModule

LORA = LoraSpec(r=4, alpha=8)


def _first_op(model: torch.nn.Module) -> torch.nn.Module:
    """The first op inside decoder layer 0: the recomputation of a checkpointed layer always runs it (it stops
    early, after the last activation the backward pass needs, so later ops may be skipped)."""
    return unwrap_peft(model).model.layers[0].self_attn.q_proj


def _run(model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, int]]:
    """Loss, gradients, and how often layer 0 ran in the forward and in the backward pass."""
    calls = []
    handle = _first_op(model).register_forward_hook(lambda *_: calls.append(1))
    loss = loss_fn()
    forward = len(calls)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, (forward, len(calls) - forward)


def _assert_same(plain, checkpointed) -> None:
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = plain, checkpointed
    assert calls[1] == 0 and calls_ckpt == (calls[0], calls[0])  # every forward pass recomputed once
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7), name


def _ids(vocab: int = 300, rows: int = 3, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    return ids, mask


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_sft_and_rm_gradients_equal_with_checkpointing(tiny_model_dir, lora):
    ids, mask = _ids()

    def sft(checkpointing: bool):
        torch.manual_seed(0)
        module = SFTModule(ModelSpec(str(tiny_model_dir), lora=lora, gradient_checkpointing=checkpointing))
        module.configure_model()
        assert unwrap_peft(module.model).is_activation_checkpointing == checkpointing
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        return _run(module.model, lambda: module._nll_and_correct(batch)[0])

    def rm(checkpointing: bool):
        torch.manual_seed(0)  # the same fresh head
        module = RewardModule(ModelSpec(str(tiny_model_dir), lora=lora, gradient_checkpointing=checkpointing))
        module.configure_model()
        assert unwrap_peft(module.model).is_activation_checkpointing == checkpointing
        return _run(module.model, lambda: (module(ids, mask, normalize=False) * torch.tensor([1.0, -2.0, 0.5])).sum())

    _assert_same(sft(False), sft(True))
    _assert_same(rm(False), rm(True))


def test_ppo_policy_and_critic_gradients_equal_with_checkpointing(tiny_model_dir, tiny_classifier_dir):
    ids, mask = _ids()
    length = 4

    def ppo(checkpointing: bool):
        torch.manual_seed(0)
        module = PPOModule(
            policy=ModelSpec(str(tiny_model_dir), gradient_checkpointing=checkpointing),
            critic=ModelSpec(str(tiny_classifier_dir), gradient_checkpointing=checkpointing),
            reward_model=ModelSpec(str(tiny_classifier_dir)),
            ppo=PPOConfig(ppo_epochs=1),
        )
        module.configure_model()
        for model in (module.policy, module.critic):
            assert unwrap_peft(model).is_activation_checkpointing == checkpointing
        assert not module.reference.is_activation_checkpointing  # frozen roles never backpropagate
        critic_calls = []
        handle = _first_op(module.critic).register_forward_hook(lambda *_: critic_calls.append(1))

        def loss():
            logits, _ = module.policy_forward(ids, mask, length)
            values = module.values(ids, mask, length, None)
            return logits.log_softmax(-1)[..., 5].sum() + (values**2).sum()

        loss_value, grads, calls = _run(module.policy, loss)
        handle.remove()
        grads.update({f"critic.{n}": p.grad.clone() for n, p in module.critic.named_parameters()})
        return loss_value, grads, calls, len(critic_calls)

    *plain, critic_plain = ppo(False)
    *checkpointed, critic_ckpt = ppo(True)
    _assert_same(plain, checkpointed)
    assert (critic_plain, critic_ckpt) == (1, 2)  # the critic's layer is recomputed too


def test_sampling_keeps_the_kv_cache_under_checkpointing(tiny_model_dir, tiny_tokenizer):
    ids, mask = _ids(rows=2, length=6)
    sampling = SamplingConfig(max_new_tokens=5)
    outputs = []
    for checkpointing in (False, True):
        module = SFTModule(ModelSpec(str(tiny_model_dir), lora=LORA, gradient_checkpointing=checkpointing))
        module.configure_model()
        model = module.model
        assert model.training  # sampling happens between training steps
        widths = []
        handle = _first_op(model).register_forward_hook(
            lambda m, args, out, widths=widths: widths.append(args[0].shape[1])
        )
        eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
        outputs.append(sample_responses(model, ids, mask, sampling, seed=3, eos_token_id=eos, pad_token_id=pad))
        handle.remove()
        assert model.training  # back in training mode afterwards
        # the prompt once, then one new token per step: the KV cache was used
        assert widths[0] == 6 and set(widths[1:]) == {1}, widths
    assert torch.equal(outputs[0], outputs[1])
