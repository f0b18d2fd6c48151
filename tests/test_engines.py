"""Rollout engines: HFEngine is the one sampler, and a new engine is one class. The engine defined below (uniform
random tokens from its own generator) is what PPO, GRPO, evaluation and SFT sample from with no other change; it
also counts the weight syncs the trainer owes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lit_rlhf.cli import main
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.evaluation import evaluate, sample
from lit_rlhf.hf import HFEngine, ModelSpec, load_model, load_tokenizer
from lit_rlhf.hf.engines import Generation, RolloutEngine
from lit_rlhf.hf.generation import SamplingConfig, sample_many, sample_responses
from lit_rlhf.labelling import write_ranking_task
from lit_rlhf.models import CriticFreeConfig, CriticFreeModule, SFTModule
from lit_rlhf.models.ppo import PPOConfig, PPOModule, RewardConfig
from lit_rlhf.models.ppo import SamplingConfig as PPOSampling
from lit_rlhf.quickstart.task import prompt_examples
from tests.conftest import write_jsonl
from tests.helpers import count_e, cpu_trainer, prompt_batch

REPO = Path(__file__).resolve().parents[1]


class UniformEngine(RolloutEngine):
    """Uniformly random tokens (never the pad token) from a generator seeded by the call's seed, each response
    ended by an EOS at a random place or cut at ``max_new_tokens``; records every call and every weight sync."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[Tensor] = []
        self.seeds: list[int] = []
        self.synced: list[Tensor] = []  # a checksum of the policy's trainable weights at each sync

    def sync_weights(self, policy: nn.Module) -> None:
        super().sync_weights(policy)
        trainable = [p.detach().double().sum() for p in policy.parameters() if p.requires_grad]
        self.synced.append(torch.stack(trainable).sum() if trainable else torch.tensor(0.0))

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, seed: int) -> Generation:
        self._require_bound()
        gen = torch.Generator().manual_seed(seed)
        vocab = self.policy.config.vocab_size if hasattr(self.policy, "config") else 64
        rows, length = len(prompt_ids), sampling.max_new_tokens
        tokens = torch.randint(0, vocab - 1, (rows, length), generator=gen)
        tokens[tokens >= self.pad_token_id] += 1  # skip the pad id
        stop = torch.randint(1, length + 2, (rows,), generator=gen)  # length + 1: no EOS
        for i, n in enumerate(stop.tolist()):
            if n <= length:
                tokens[i, n - 1] = self.eos_token_id
                tokens[i, n:] = self.pad_token_id
        self.outputs.append(tokens)
        self.seeds.append(seed)
        return Generation(tokens.to(prompt_ids.device))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "train.jsonl", prompt_examples(16, seed=1, split="train"))


def test_hf_engine_is_the_one_sampler(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = load_model(ModelSpec(str(tiny_model_dir)), tokenizer, trainable=False)
    enc = tokenizer(["The movie was", "I thought the book was really"], return_tensors="pt", padding=True)
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.8)
    engine = HFEngine()
    engine.bind(model, tokenizer)
    state = torch.get_rng_state()
    out = engine.generate(enc.input_ids, enc.attention_mask, sampling, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # seeded without side effects
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    expected = sample_responses(model, enc.input_ids, enc.attention_mask, sampling, 5, eos, pad)
    assert out.logprobs is None and torch.equal(out.responses, expected)
    ids = [tokenizer(p)["input_ids"] for p in ("a b", "the movie was", "c")]
    many = engine.generate_many(ids, sampling, seed=3, batch_size=2)
    assert torch.equal(many, sample_many(model, ids, sampling, 3, eos, pad, batch_size=2))
    engine.close()
    with pytest.raises(RuntimeError, match="not bound"):
        engine.generate(enc.input_ids, enc.attention_mask, sampling, seed=5)


def test_ppo_samples_from_the_engine_and_syncs_it_after_every_update(tiny_model_dir, prompts):
    engine = UniformEngine()
    module = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=count_e),
        sampling=PPOSampling(max_new_tokens=6),
        ppo=PPOConfig(ppo_epochs=1, num_mini_batches=1),
        engine=engine,
    )
    module.configure_model()
    batch = prompt_batch(module, prompts, 4)
    rollout, _ = module.collect_rollout(batch)
    assert torch.equal(rollout.responses, engine.outputs[-1][:, : rollout.responses.shape[1]])
    assert engine.outputs[-1][:, rollout.responses.shape[1] :].eq(module.tokenizer.pad_token_id).all()

    # through the Trainer: one engine call per iteration, a sync after each update with the new weights
    engine2 = UniformEngine()
    module2 = PPOModule(
        policy=ModelSpec(str(tiny_model_dir)),
        value_head=True,
        reward=RewardConfig(fn=count_e),
        sampling=PPOSampling(max_new_tokens=6),
        engine=engine2,
    )
    dm = PromptDataModule(str(prompts), batch_size=4)
    cpu_trainer(max_steps=3 * 4).fit(module2, datamodule=dm)  # 3 iterations × 4 optimizer steps (PPO defaults)
    assert len(engine2.outputs) == 3 and len(set(engine2.seeds)) == 3
    # bind (before the first rollout) + one sync after each iteration's update, each with changed weights
    assert len(engine2.synced) == 1 + 3
    assert all(not torch.equal(a, b) for a, b in zip(engine2.synced, engine2.synced[1:]))
    assert not engine2.is_bound  # closed at teardown


@pytest.mark.parametrize("group_size", [3])
def test_grpo_samples_its_groups_from_the_engine(tiny_model_dir, prompts, group_size):
    engine = UniformEngine()
    module = CriticFreeModule(
        policy=ModelSpec(str(tiny_model_dir)),
        reward=RewardConfig(fn=count_e),
        sampling=PPOSampling(max_new_tokens=6),
        algorithm=CriticFreeConfig(group_size=group_size),
        engine=engine,
    )
    module.configure_model()
    batch = module.grouped(prompt_batch(module, prompts, 2))
    rollout, _ = module.collect_rollout(batch)
    assert len(engine.outputs) == 1 and engine.outputs[0].shape[0] == 2 * group_size  # one call for all groups
    assert torch.equal(rollout.responses, engine.outputs[0][:, : rollout.responses.shape[1]])
    # the scores are those of the engine's responses
    texts = module.tokenizer.batch_decode(
        [r[m] for r, m in zip(rollout.responses, rollout.mask, strict=True)], skip_special_tokens=True
    )
    assert rollout.scores.tolist() == pytest.approx(count_e(None, texts))


def test_evaluation_labelling_and_sft_sample_from_the_engine(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = load_model(ModelSpec(str(tiny_model_dir)), tokenizer, trainable=False)
    prompts = ["The movie was", "The hotel was", "I thought the book was"]
    engine = UniformEngine()
    samples = sample(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, seed=7, engine=engine)
    assert engine.seeds == [7, 8]  # generate_many's default: one call per batch, seeds continuing
    produced = torch.cat(engine.outputs)
    assert torch.equal(samples.response_ids, produced[:, : samples.response_ids.shape[1]])

    engine = UniformEngine()
    result = evaluate(str(tiny_model_dir), prompts, reward_fn=count_e, max_new_tokens=5, seed=3, engine=engine)
    expected = tokenizer.batch_decode(torch.cat(engine.outputs), skip_special_tokens=True)
    assert [row["policy_response"] for row in result.rows] == expected
    assert not engine.is_bound  # evaluate closes the engine it was given

    engine = UniformEngine()
    task = write_ranking_task(str(tiny_model_dir), prompts, str(tmp_path / "task.jsonl"), k=2, engine=engine)
    assert task.exists() and len(engine.outputs) == 1

    engine = UniformEngine()
    sft = SFTModule(ModelSpec(str(tiny_model_dir)), max_new_tokens=4, engine=engine)
    sft.configure_model()
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    answers = sft.predict_step({"prompt_input_ids": enc.input_ids, "prompt_attention_mask": enc.attention_mask}, 0)
    assert answers == tokenizer.batch_decode(engine.outputs[0], skip_special_tokens=True)


def test_the_engine_is_chosen_in_yaml(capsys):
    config = REPO / "configs" / "quickstart" / "grpo.yaml"
    cli = main(
        ["--config", str(config), "--model.init_args.engine=tests.test_engines.UniformEngine"],
        run=False,
    )
    assert isinstance(cli.model.engine, UniformEngine)
    default = main(["--config", str(config)], run=False)
    assert type(default.model.engine) is HFEngine
