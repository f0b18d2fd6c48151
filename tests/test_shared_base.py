"""Shared-base PPO: policy, critic and reward model as LoRA adapters of one base; the reference is the base alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.hf import LoraSpec, ModelSpec, QuantizationSpec, load_model
from lit_rlhf.hf.export import REWARD_NORMALIZATION_FILE
from lit_rlhf.hf.forwards import critic_values, response_logits
from lit_rlhf.hf.loading import load_tokenizer
from lit_rlhf.hf.scoring import sequence_scores, set_reward_normalization, token_scores
from lit_rlhf.hf.shared_base import CRITIC, POLICY, REWARD
from lit_rlhf.models.ppo import KLConfig, PPOConfig, PPOModule, RewardConfig, SamplingConfig, SharedBaseConfig
from lit_rlhf.quickstart.task import prompt_examples
from lit_rlhf.rlhf import logprobs_from_logits
from tests.conftest import write_jsonl
from tests.helpers import cpu_trainer, randomize_lora, trainer_override

LORA = LoraSpec(r=4, alpha=8)


@pytest.fixture(scope="session")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "train.jsonl", prompt_examples(32, seed=1, split="train"))


def shared_module(model_dir, adapter_dir, policy: ModelSpec | None = None, **kwargs) -> PPOModule:
    module = PPOModule(
        policy=policy or ModelSpec(str(model_dir), lora=LORA),
        shared_base=kwargs.pop("shared_base", SharedBaseConfig(reward_adapter=str(adapter_dir))),
        sampling=kwargs.pop("sampling", SamplingConfig(max_new_tokens=6)),
        **kwargs,
    )
    module.configure_model()
    return module


def batch_of(module: PPOModule, path: Path, size: int = 6) -> dict:
    dm = PromptDataModule(str(path), batch_size=size)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm.collate([dm.train_dataset[i] for i in range(size)])


def test_rm_stage_exports_adapter_score_head_and_normalization(rm_adapter_dir):
    files = {p.name for p in rm_adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", REWARD_NORMALIZATION_FILE} <= files
    assert "config.json" not in files and "model.safetensors" not in files  # not merged
    from safetensors.torch import load_file

    keys = load_file(str(rm_adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys
    assert json.loads((rm_adapter_dir / REWARD_NORMALIZATION_FILE).read_text()) == {
        "reward_bias": 0.3,
        "reward_scale": 2.0,
    }


def test_roles_equal_the_standalone_models_and_first_ratio_is_one(tmp_path, tiny_model_dir, rm_adapter_dir, prompts):
    from peft import PeftModel

    module = shared_module(tiny_model_dir, rm_adapter_dir, sampling=SamplingConfig(max_new_tokens=8, temperature=0.7))
    randomize_lora(module.policy, 0.5, seed=5)  # the policy adapter differs from the base and from the RM's
    for adapter in (POLICY, CRITIC, REWARD):
        assert any(f".{adapter}." in n for n, _ in module.policy.named_parameters())
    batch = batch_of(module, prompts)
    rollout, _ = module.collect_rollout(batch)
    qr, am = rollout.query_responses, rollout.attention_mask
    tok = module.tokenizer

    # reward: the RM adapter loaded alone on its own base, and the same RM merged into full weights
    base = load_model(ModelSpec(str(tiny_model_dir)), tok, "sequence_classifier", trainable=False)
    alone = PeftModel.from_pretrained(base, str(rm_adapter_dir)).eval()
    set_reward_normalization(alone, 0.3, 2.0)
    shared_scores = sequence_scores(module.reward_model, qr, am)
    assert torch.allclose(shared_scores, sequence_scores(alone, qr, am), atol=1e-5)
    assert torch.allclose(rollout.scores, shared_scores, atol=1e-6)  # the rollout used them (no score shaping)
    base = load_model(ModelSpec(str(tiny_model_dir)), tok, "sequence_classifier", trainable=False)
    merged = PeftModel.from_pretrained(base, str(rm_adapter_dir)).merge_and_unload().eval()
    set_reward_normalization(merged, 0.3, 2.0)
    assert torch.allclose(shared_scores, sequence_scores(merged, qr, am), atol=1e-5)

    # reference: the base model's log-probs, bit for bit
    sft = load_model(ModelSpec(str(tiny_model_dir)), tok, "causal_lm", trainable=False)
    length = rollout.responses.shape[1]
    ref_logits, _ = response_logits(sft, qr, am, length)
    ref = torch.where(rollout.mask, logprobs_from_logits(ref_logits, rollout.responses, 0.7), 0)
    assert torch.allclose(rollout.ref_logprobs, ref, atol=1e-6)
    assert (rollout.logprobs - rollout.ref_logprobs).abs().max() > 1e-3  # the policy adapter was active

    # critic initialised from the reward model: V = the RM's normalised per-token scores
    bias, scale = 0.3, 2.0
    rm_tokens = (token_scores(alone, qr, am)[:, -length - 1 : -1] - bias) / scale
    assert torch.allclose(rollout.values, torch.where(rollout.mask, rm_tokens, 0), atol=1e-5)

    # first minibatch: ratio 1, in another grouping than the rollout's
    micro = rollout.select([4, 1, 2]).trim()
    logits, _ = module.policy_forward(micro.query_responses, micro.attention_mask, micro.responses.shape[1])
    new = logprobs_from_logits(logits, micro.responses, 0.7)
    assert (torch.exp(torch.where(micro.mask, new - micro.logprobs, 0)) - 1).abs().max() < 1e-5
    assert module.policy.active_adapter == POLICY


def _trainer(root: Path, steps: int, **kwargs) -> L.Trainer:
    return cpu_trainer(max_steps=steps, default_root_dir=root, **kwargs)


def _module_for_training(model_dir, adapter_dir, **kwargs) -> PPOModule:
    module = PPOModule(
        policy=ModelSpec(str(model_dir), lora=LORA),
        shared_base=SharedBaseConfig(reward_adapter=str(adapter_dir)),
        sampling=SamplingConfig(max_new_tokens=5),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=2, critic_lr=2e-3),
        kl=KLConfig(coef=0.1, target=0.5, horizon=100),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0),
        **kwargs,
    )
    torch.manual_seed(0)  # the policy adapter's lora_A is drawn at build time: the same in every run
    module.configure_model()
    return module


def test_training_moves_only_the_trained_adapters_and_heads_and_resumes(tmp_path, tiny_model_dir, rm_adapter_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_examples(16, seed=5))  # 2 iterations per epoch
    saver = lambda root: L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)  # noqa: E731
    module = _module_for_training(tiny_model_dir, rm_adapter_dir)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(f".{POLICY}." in n or f".{CRITIC}." in n or n.startswith("critic.score") for n in trained)
    trainer = _trainer(tmp_path / "a", steps=2 * 2, callbacks=[saver(tmp_path / "a")], enable_checkpointing=True)
    trainer.fit(module, PromptDataModule(str(prompts), batch_size=8))
    after = dict(module.named_parameters())
    # the requires_grad map survived every adapter switch, and only trained weights moved
    assert {n for n, p in after.items() if p.requires_grad} == trained
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed <= trained
    assert any(f".{POLICY}." in n for n in changed) and any(f".{CRITIC}." in n for n in changed)
    assert "critic.score.weight" in changed
    groups = trainer.optimizers[0].param_groups
    critic_ids = {id(p) for p in groups[1]["params"]}
    assert critic_ids == {id(p) for n, p in module.named_parameters() if p.requires_grad and "critic" in n}
    # checkpoints hold the trained adapters and head only: no base, no reward adapter or head
    saved = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    # (besides the module's own state: running score statistics and epoch metric sums)
    assert {k for k in saved if not k.startswith(("score_moments", "skipped_steps"))} == trained

    # resume after one iteration: the same weights and KL coefficient as the uninterrupted run
    first = _module_for_training(tiny_model_dir, rm_adapter_dir)
    _trainer(tmp_path / "b", steps=2, callbacks=[saver(tmp_path / "b")], enable_checkpointing=True).fit(
        first, PromptDataModule(str(prompts), batch_size=8)
    )
    resumed = _module_for_training(tiny_model_dir, rm_adapter_dir)
    _trainer(tmp_path / "b", steps=2 * 2, callbacks=[saver(tmp_path / "b")], enable_checkpointing=True).fit(
        resumed, PromptDataModule(str(prompts), batch_size=8), ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt"
    )
    assert resumed.iteration == module.iteration == 2
    assert resumed.kl_ctl.value == module.kl_ctl.value != 0.1
    diffs = {name: float((p - after[name]).abs().max()) for name, p in resumed.named_parameters()}
    assert max(diffs.values()) < 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def _loss_and_grads(model_dir, adapter_dir, prompts, checkpointing: bool):
    torch.manual_seed(0)
    module = shared_module(
        model_dir,
        adapter_dir,
        policy=ModelSpec(str(model_dir), lora=LORA, gradient_checkpointing=checkpointing),
        ppo=PPOConfig(ppo_epochs=1),
    )
    randomize_lora(module.policy, 0.2, seed=6, adapters=(POLICY, CRITIC))
    rollout, _ = module.collect_rollout(batch_of(module, prompts))
    advantages = torch.linspace(-1, 1, rollout.advantages.numel()).view_as(rollout.advantages)
    # a value target the critic has to move towards, and advantages of both signs
    rollout = rollout._replace(advantages=advantages.masked_fill(~rollout.mask, 0), returns=rollout.values + 0.5)
    # the first op inside the checkpointed decoder layer (the recomputation stops early, after the last needed one)
    layer = module.policy.get_base_model().model.layers[0].self_attn.q_proj
    calls = []
    handle = layer.register_forward_hook(lambda *_: calls.append(1))
    loss, _ = module._ppo_loss(rollout, rollout.mask.sum().float(), rollout.mask.sum().float())
    forward_calls = len(calls)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return module, loss.detach(), grads, forward_calls, len(calls) - forward_calls


def test_gradient_checkpointing_gives_the_same_gradients_through_each_adapter(tiny_model_dir, rm_adapter_dir, prompts):
    plain, loss, grads, fwd, recomputed = _loss_and_grads(tiny_model_dir, rm_adapter_dir, prompts, False)
    ckpt, loss_ckpt, grads_ckpt, fwd_ckpt, recomputed_ckpt = _loss_and_grads(
        tiny_model_dir, rm_adapter_dir, prompts, True
    )
    assert (
        ckpt.policy.get_base_model().is_activation_checkpointing
        and not plain.policy.get_base_model().is_activation_checkpointing
    )
    assert (fwd, recomputed) == (2, 0)  # policy and critic passes
    assert (fwd_ckpt, recomputed_ckpt) == (2, 2)  # ... each recomputed in the backward pass
    assert torch.allclose(loss, loss_ckpt, atol=1e-7)
    assert grads.keys() == grads_ckpt.keys()
    critic_grads = [n for n in grads if f".{CRITIC}." in n and grads[n].abs().sum() > 0]
    policy_grads = [n for n in grads if f".{POLICY}." in n and grads[n].abs().sum() > 0]
    assert critic_grads and policy_grads
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-5, atol=1e-7), name


def test_4bit_shared_base_scores_like_the_4bit_reward_model_and_trains(
    tmp_path, tiny_model_dir, rm_adapter_dir, prompts
):
    import bitsandbytes as bnb
    from peft import PeftModel

    four_bit = QuantizationSpec(bits=4, compute_dtype="float32")
    policy = ModelSpec(str(tiny_model_dir), lora=LORA, quantization=four_bit, gradient_checkpointing=True)
    module = PPOModule(
        policy=policy,
        shared_base=SharedBaseConfig(reward_adapter=str(rm_adapter_dir)),
        sampling=SamplingConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    module.configure_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.policy.modules())
    tok = module.tokenizer
    batch = batch_of(module, prompts, size=4)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    base = load_model(ModelSpec(str(tiny_model_dir), quantization=four_bit), tok, "sequence_classifier", False)
    alone = PeftModel.from_pretrained(base, str(rm_adapter_dir)).eval()
    set_reward_normalization(alone, 0.3, 2.0)
    with torch.no_grad():  # as in the rollout
        shared_scores, alone_scores = sequence_scores(module.reward_model, ids, mask), sequence_scores(alone, ids, mask)
    assert torch.allclose(shared_scores, alone_scores, atol=1e-5)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if f".{REWARD}." in n}
    _trainer(tmp_path, steps=1).fit(module, PromptDataModule(str(prompts), batch_size=4))
    params = dict(module.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in trained.items() if f".{CRITIC}." in n)
    assert any(not torch.equal(params[n], p) for n, p in trained.items() if f".{POLICY}." in n)
    assert all(torch.equal(params[n], p) for n, p in frozen.items())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
@pytest.mark.parametrize("trainable", [True, False])
def test_4bit_load_keeps_no_map_of_the_full_precision_checkpoint(tmp_path, tiny_tokenizer, trainable):
    """A view into the safetensors map (an unquantized tensor) kept the whole checkpoint resident beside its
    4-bit copy; the loaded model holds copies instead, bitwise equal to the checkpoint."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from lit_rlhf.quickstart.assets import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "base", tiny_tokenizer, hidden_size=64, num_layers=2)
    checkpoint = (model_dir / "model.safetensors").resolve()
    spec = ModelSpec(str(model_dir), lora=LORA if trainable else None, quantization=QuantizationSpec(bits=4))
    model = load_model(spec, load_tokenizer(spec), trainable=trainable)

    assert str(checkpoint) not in Path("/proc/self/maps").read_text()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    stored = load_file(str(checkpoint))
    params = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    unquantized = {n: p for n, p in params.items() if p.dtype.is_floating_point}
    compared = [k for k in stored if k in unquantized]
    assert "model.embed_tokens.weight" in compared and "model.norm.weight" in compared
    for key in compared:
        assert torch.equal(unquantized[key], stored[key]), key


def test_4bit_lora_gradients_are_the_same_after_an_eval_forward(tiny_model_dir):
    """bitsandbytes repacks a 4-bit weight for a bf16 CPU kernel without autograd at its first eval-mode no-grad
    forward (on CPUs with AVX512-BF16; ``generate`` is one); the loaded models never let it."""
    import bitsandbytes as bnb

    spec = ModelSpec(str(tiny_model_dir), lora=LORA, quantization=QuantizationSpec(bits=4, compute_dtype="float32"))
    model = load_model(spec, load_tokenizer(spec))
    randomize_lora(model, 0.3, seed=5)
    ids = torch.tensor([[1, 5, 9, 3, 7, 11]])

    def lora_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = lora_grads()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert before.keys() == after.keys() and any(g.abs().sum() > 0 for g in before.values())
    for name, grad in before.items():
        assert torch.equal(grad, after[name]), name


def test_exports_merged_policy_and_critic_both_ways(tmp_path, tiny_model_dir, rm_adapter_dir, prompts):
    module = shared_module(tiny_model_dir, rm_adapter_dir)
    randomize_lora(module.policy, 0.3, seed=7, adapters=(POLICY, CRITIC))  # away from their initial values
    with torch.no_grad():
        module.critic.score.weight.mul_(1.5)
    tok = module.tokenizer
    batch = batch_of(module, prompts, size=4)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    # the merged policy: the policy adapter only (not the critic's or the reward model's)
    module.export_hf(tmp_path / "policy")
    merged = load_model(ModelSpec(str(tmp_path / "policy")), tok, "causal_lm", trainable=False)
    expected, _ = module.policy_forward(ids, mask, 3)
    assert torch.allclose(response_logits(merged, ids, mask, 3)[0], expected, atol=1e-5)
    # the critic merged into a sequence classifier (a four-model run's critic), values unchanged
    values = critic_values(module.critic, ids, mask, 3)
    module.export_critic_hf(tmp_path / "critic")
    critic = load_model(ModelSpec(str(tmp_path / "critic")), tok, "sequence_classifier", trainable=False)
    assert torch.allclose(critic_values(critic, ids, mask, 3), values, atol=1e-5)
    # ... or unmerged, in the RM-export format a shared-base run reads as its reward adapter
    module.export_critic_hf(tmp_path / "critic_adapter", merge_adapters=False)
    again = shared_module(tiny_model_dir, tmp_path / "critic_adapter")
    assert torch.allclose(critic_values(again.reward_model, ids, mask, 3), values, atol=1e-5)
    assert load_tokenizer(str(tmp_path / "critic_adapter")).get_vocab() == tok.get_vocab()


def test_reward_fn_with_a_zero_critic(tmp_path, tiny_model_dir, prompts):
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir), lora=LORA),
        shared_base=SharedBaseConfig(critic_init="zero", critic_lora=LoraSpec(r=2, alpha=4)),
        reward=RewardConfig(fn=lambda p, r: [float(x.count("e")) for x in r]),
        sampling=SamplingConfig(max_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1),
    )
    module.configure_model()
    assert module.reward_model is None and module.reference is None
    rollout, _ = module.collect_rollout(batch_of(module, prompts, size=4))
    assert torch.equal(rollout.values, torch.zeros_like(rollout.values))  # zero head: V ≡ 0
    ranks = {p.shape[0] for n, p in module.policy.named_parameters() if f"lora_A.{CRITIC}." in n}
    assert ranks == {2}


def test_config_errors(tmp_path, tiny_model_dir, tiny_classifier_dir, rm_adapter_dir):
    spec, lora_spec = ModelSpec(str(tiny_model_dir)), ModelSpec(str(tiny_model_dir), lora=LORA)
    shared = SharedBaseConfig(reward_adapter=str(rm_adapter_dir))
    with pytest.raises(ValueError, match="remove critic"):
        PPOModule(policy=lora_spec, shared_base=shared, critic=spec)
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        PPOModule(policy=spec, shared_base=shared).configure_model()
    with pytest.raises(ValueError, match="exactly one score source"):
        PPOModule(policy=lora_spec, shared_base=shared, reward=RewardConfig(fn="a.b:c"))
    with pytest.raises(ValueError, match="critic_init: reward_model needs"):
        SharedBaseConfig()
    with pytest.raises(FileNotFoundError, match="HFExport\\(merge_adapters: false\\)"):
        shared_module(tiny_model_dir, tiny_classifier_dir)  # a merged export is not an adapter
    other_base = tmp_path / "other"
    other_base.mkdir()
    with pytest.raises(ValueError, match="was trained on"):
        shared_module(other_base, rm_adapter_dir, policy=ModelSpec(str(other_base), str(tiny_model_dir), lora=LORA))


@pytest.mark.timeout(600)
def test_cli_run_under_ddp_with_two_processes(tmp_path, tiny_model_dir, rm_adapter_dir):
    """The YAML schema end to end: one iteration in two DDP processes on one shared base, the merged export."""
    import yaml

    from tests.test_distributed import ROOT, cli

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_examples(32, seed=1))
    run = tmp_path / "ppo"
    override = {
        "trainer": trainer_override(run, max_epochs=1, limit_train_batches=1),
        "model": {
            "init_args": {
                "policy": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}},
                "critic": None,
                "reward_model": None,
                "shared_base": {"reward_adapter": str(rm_adapter_dir)},
                "sampling": {"max_new_tokens": 6},
                "ppo": {"ppo_epochs": 1, "num_mini_batches": 1, "micro_batch_size": 4},
                "kl": {"coef": 0.1, "target": 6.0, "horizon": 100},
                "ptx": None,
            }
        },
        "data": {"init_args": {"train_data": str(prompts), "val_data": None, "batch_size": 8}},
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(override))
    config = str(ROOT / "configs/quickstart/ppo.yaml")
    cli("fit", "--config", config, "--config", str(path), "--trainer.devices=2", "--trainer.strategy=ddp")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ppo_state"]["iteration"] == 1
    assert ckpt["ppo_state"]["kl_controller"]["value"] != 0.1  # the controller moved, on the global KL
    saved = [k for k in ckpt["state_dict"] if not k.startswith(("score_moments", "skipped_steps"))]
    assert saved and all(f".{POLICY}." in k or f".{CRITIC}." in k or k.startswith("critic.score") for k in saved)
    assert (run / "export" / "model.safetensors").exists()  # the merged policy


def test_grpo_on_a_shared_base_has_no_critic_scores_like_the_reward_model_and_trains_only_the_policy(
    tmp_path, tiny_model_dir, rm_adapter_dir, prompts
):
    from peft import PeftModel

    from lit_rlhf.models.critic_free import CriticFreeConfig, CriticFreeModule

    module = CriticFreeModule(
        policy=ModelSpec(str(tiny_model_dir), lora=LORA),
        shared_base=SharedBaseConfig(reward_adapter=str(rm_adapter_dir)),
        algorithm=CriticFreeConfig("grpo", group_size=2, ppo_epochs=1),
        sampling=SamplingConfig(max_new_tokens=5),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    module.configure_model()
    assert module.critic is None and not any(f".{CRITIC}." in n for n, _ in module.named_parameters())
    batch = batch_of(module, prompts, size=4)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    alone = PeftModel.from_pretrained(
        load_model(ModelSpec(str(tiny_model_dir)), module.tokenizer, "sequence_classifier", False), str(rm_adapter_dir)
    ).eval()
    set_reward_normalization(alone, 0.3, 2.0)
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_scores(module.reward_model, ids, mask), sequence_scores(alone, ids, mask), atol=1e-5, rtol=0
        )
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if f".{REWARD}." in n}
    assert trained and all(f".{POLICY}." in n for n in trained)
    _trainer(tmp_path, steps=1).fit(module, PromptDataModule(str(prompts), batch_size=4))
    params = dict(module.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in trained.items())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
