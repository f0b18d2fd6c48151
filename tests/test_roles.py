"""Roles: the one description of a run's models (lit_rlhf.models.roles) that a module builds from and the planner
reads. Every configuration's sources, the checks of the constructor, and the planner agreeing with the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_rlhf.hf.specs import LoraSpec, ModelSpec
from lit_rlhf.models.roles import Roles

POLICY = ModelSpec("policy")
LORA_POLICY = ModelSpec("policy", lora=LoraSpec(r=4))
CRITIC = ModelSpec("critic")
RM = ModelSpec("rm")


@pytest.mark.parametrize(
    ("kwargs", "reference", "value", "reward", "specs"),
    [
        (
            dict(policy=POLICY, critic=CRITIC, reward_model=RM),
            "copy",
            "critic",
            "model",
            ["policy", "reference", "critic", "reward_model"],
        ),
        (
            dict(policy=LORA_POLICY, critic=CRITIC, reward_model=RM),
            "disabled_adapter",
            "critic",
            "model",
            ["policy", "reference", "critic", "reward_model"],
        ),
        (
            dict(policy=POLICY, value_head=True, reward_fn=True, reference=ModelSpec("ref")),
            "explicit",
            "value_head",
            "function",
            ["policy", "reference"],
        ),
        (
            dict(policy=LORA_POLICY, shared_base=True, reward_adapter="rm_adapter"),
            "base",
            "adapter",
            "adapter",
            ["policy"],
        ),
        (
            dict(policy=POLICY, reward_model=RM, value_function=False),
            "copy",
            None,
            "model",
            ["policy", "reference", "reward_model"],
        ),
    ],
)
def test_policy_gradient_sources(kwargs, reference, value, reward, specs):
    roles = Roles.policy_gradient(**kwargs)
    assert (roles.reference_source, roles.value_source, roles.reward_source) == (reference, value, reward)
    assert list(roles.specs()) == specs
    assert roles.loads_reference == (reference in ("explicit", "copy"))
    assert roles.trainable == (("policy", "critic") if value == "critic" else ("policy",))
    assert roles.specs()["policy"] is kwargs["policy"]  # the same objects: an edit by role name is built
    assert roles.specs() == roles.specs() and roles.specs().get("reference") is roles.specs().get("reference")


def test_reference_of_a_lora_policy_is_read_when_asked():
    """LoRAQuantization gives the policy LoRA after the module is built: the reference follows."""
    roles = Roles.policy_gradient(policy=ModelSpec("policy"), reward_fn=True, value_head=True)
    assert roles.reference_source == "copy" and roles.loads_reference
    roles.policy.lora = LoraSpec(r=4)
    assert roles.reference_source == "disabled_adapter" and not roles.loads_reference
    assert roles.specs()["reference"].lora is None  # the copy a callback may edit never gets the adapter


def test_preference_sources():
    assert Roles.preference(POLICY, None).reference_source == "copy"
    assert Roles.preference(LORA_POLICY, None).reference_source == "disabled_adapter"
    assert Roles.preference(POLICY, ModelSpec("ref")).reference_source == "explicit"
    simpo = Roles.preference(POLICY, None, uses_reference=False)
    assert simpo.reference_source is None and not simpo.loads_reference and list(simpo.specs()) == ["policy"]
    assert simpo.value_source is None and simpo.reward_source is None
    assert simpo.describe() == "policy: policy\nreference: none"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(critic=CRITIC), "exactly one score source: `reward_model` or `reward.fn`"),
        (dict(critic=CRITIC, reward_model=RM, reward_fn=True), "exactly one score source"),
        (dict(reward_model=RM), "exactly one value function: `critic` or `value_head: true`"),
        (dict(reward_model=RM, critic=CRITIC, value_head=True), "exactly one value function"),
        (dict(shared_base=True, reward_model=RM, reward_adapter="a"), "remove reward_model"),
        (dict(shared_base=True, value_head=True, reward_fn=True), "remove value_head"),
        (dict(shared_base=True), "`shared_base.reward_adapter` or `reward.fn`"),
    ],
)
def test_policy_gradient_checks(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        Roles.policy_gradient(policy=LORA_POLICY, stage="GRPOModule", **kwargs)
    assert "shared_base" in str(error.value) or "GRPOModule" in str(error.value)


def test_critic_free_takes_no_value_function():
    roles = Roles.policy_gradient(policy=POLICY, reward_fn=True, value_head=True, value_function=False)
    assert roles.value_source is None and not roles.value_head
    assert "value:" not in roles.describe() and "reward: reward.fn" in roles.describe()


# ---- the planner reads the module's roles ------------------------------------------------------------------------
def _dpo_config(tmp_path: Path, policy: Path, **init_args) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "logger": False},
        "model": {
            "class_path": "lit_rlhf.models.DPOModule",
            "init_args": {"policy": {"name_or_path": str(policy)}, "micro_batch_size": 4, **init_args},
        },
        "data": {
            "class_path": "lit_rlhf.datamodules.PreferenceDataModule",
            "init_args": {"train_data": "pairs.jsonl", "max_length": 32, "batch_size": 8},
        },
    }
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _plan(path: Path, *overrides: str, responses_per_prompt: int = 2):
    from lit_rlhf.plan import _read_config, run_from_config

    config, module, data = _read_config(["--config", str(path), *overrides])
    run, notes = run_from_config(config, module, data, None, False, responses_per_prompt)
    return module, run, run.plan(), notes


def test_planner_plans_dpo_with_the_module_reference(tmp_path, tiny_model_dir):
    path = _dpo_config(tmp_path, tiny_model_dir)
    module, run, copy, _ = _plan(path)
    assert module.roles.reference_source == "copy"
    assert [r.name for r in copy.roles] == ["policy", "reference"] and "reference" in copy.phases
    policy, reference = copy.roles
    assert reference.weights == policy.weights > 0 and reference.optimizer == reference.gradients == 0

    lora = ["--model.init_args.policy.lora.r=4", "--model.init_args.policy.lora.alpha=8"]
    module, _, adapter, _ = _plan(path, *lora)
    assert module.roles.reference_source == "disabled_adapter"
    assert [r.name for r in adapter.roles] == ["policy", "reference"]
    assert adapter.roles[1].weights == 0 and adapter.roles[1].adapters == 0  # the policy's base, adapter off
    assert adapter.peak < copy.peak

    _, _, four, _ = _plan(path, responses_per_prompt=4)
    assert four.phases["training"] > copy.phases["training"]  # 4 x 4 sequences per micro-batch, not 4 x 2

    _, _, precomputed, notes = _plan(path, "--model.init_args.precompute_ref_logprobs=true")
    assert "reference" not in precomputed.phases and any("precomputed" in note for note in notes)

    module, _, simpo, _ = _plan(path, "--model.init_args.loss_type=simpo")
    assert module.roles.reference_source is None and [r.name for r in simpo.roles] == ["policy"]


def test_planner_ppo_roles_are_the_module_roles(tmp_path, tiny_model_dir, tiny_classifier_dir):
    """The planner lays out what the module's build_models will hold, for each reference and value source."""
    from tests.test_plan import _ppo_config

    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    cases = {
        (): ["policy", "reference", "critic", "reward_model"],
        ("--model.init_args.policy.lora.r=4",): ["policy", "critic", "reward_model"],
        ("--model.init_args.critic=null", "--model.init_args.value_head=true"): ["policy", "reference", "reward_model"],
    }
    for overrides, names in cases.items():
        module, run, plan, _ = _plan(path, *overrides)
        assert list(run.specs) == names, overrides
        assert module.roles.loads_reference == ("reference" in names)
        assert module.roles.value_source == ("critic" if "critic" in names else "value_head")
