"""The memory planner: its arithmetic against hand-computed figures and the libraries' own storage, and the
``python -m lit_rlhf.plan`` command on a tiny config (every role and phase named, one-line errors, verdict)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from lit_rlhf.hf.specs import LoraSpec, QuantizationSpec
from lit_rlhf.plan import main, parse_size
from lit_rlhf.planning.memory import (
    Architecture,
    RoleSetup,
    Run,
    Workload,
    kv_cache_bytes,
    layer_activation_elements,
    lora_parameters,
    plan_memory,
    quantized_4bit_bytes,
    quantized_linear_bytes,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ROOT / "docs" / "data" / "llama3-8b" / "config.json"


@pytest.fixture(scope="module")
def llama3_8b() -> Architecture:
    from transformers import AutoConfig

    return Architecture.from_config(AutoConfig.from_pretrained(LLAMA3_8B.parent))


def test_llama3_8b_parameters_and_bf16_weights(llama3_8b):
    # Meta-Llama-3-8B has 8,030,261,248 parameters (untied head, no biases)
    assert llama3_8b.num_parameters("causal_lm") == 8_030_261_248
    assert weight_bytes(llama3_8b, "causal_lm", 2) == 2 * 8_030_261_248
    # a reward model: the 128256 x 4096 unembedding replaced by a 4096 -> 1 head
    assert llama3_8b.num_parameters("sequence_classifier") == 8_030_261_248 - 128256 * 4096 + 4096


def test_kv_cache_by_hand(llama3_8b):
    # 2 (K, V) x 32 layers x 8 kv heads x 128 head dim x 4 rows x (256 + 128) tokens x 2 bytes
    assert (
        kv_cache_bytes(llama3_8b, batch=4, tokens=384, dtype_bytes=2) == 2 * 32 * 8 * 128 * 4 * 384 * 2 == 201_326_592
    )


def test_4bit_bytes_by_hand():
    n = 4096 * 4096  # a q_proj of Llama-3-8B
    blocks = n // 64  # 262144 absmax values
    assert quantized_4bit_bytes(n, double_quant=False) == n // 2 + 4 * blocks + 64
    # uint8 absmax + a float32 absmax per 256 of them + the 256-entry code + the offset + the NF4 code
    assert quantized_4bit_bytes(n, double_quant=True) == n // 2 + blocks + 4 * 1024 + 1024 + 4 + 64 == 8_655_940


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_bytes_match_bitsandbytes_storage(double_quant):
    import bitsandbytes.functional as F

    weight = torch.randn(192, 320)  # 61440 weights: 960 blocks, 4 nested blocks
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    tensors = [packed, state.absmax, state.code]
    if double_quant:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert quantized_4bit_bytes(weight.numel(), double_quant) == stored


def test_4bit_model_keeps_embeddings_and_head_unquantized(llama3_8b):
    q = QuantizationSpec(bits=4, double_quant=True)
    linear = 32 * sum(quantized_4bit_bytes(i * o, True) for _, i, o, _ in llama3_8b.linears())
    other = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096  # embeddings, lm_head, norms
    assert weight_bytes(llama3_8b, "causal_lm", 2, q) == linear + 2 * other
    # QLoRA: peft's prepare_model_for_kbit_training casts everything unquantized to float32
    assert weight_bytes(llama3_8b, "causal_lm", 2, q, trainable=True) == linear + 4 * other


def test_lora_parameters(llama3_8b):
    # peft reports 41,943,040 trainable parameters for Llama-3-8B, r=16, all linear layers
    assert lora_parameters(llama3_8b, LoraSpec(r=16)) == 41_943_040
    # q and v only: 32 x 16 x ((4096 + 4096) + (4096 + 1024))
    assert lora_parameters(llama3_8b, LoraSpec(r=16, target_modules=["q_proj", "v_proj"])) == 32 * 16 * (8192 + 5120)


def test_activation_formula_matches_saved_tensors_of_a_llama_layer():
    """The per-layer constants are exact for HF Llama (sdpa, fp32): count what autograd saves for one layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def saved_bytes(layers: int) -> int:
        model = LlamaForCausalLM(replace_layers(config, layers)).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved.clear()
        ids = torch.randint(0, 128, (3, 24))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return sum(n for ptr, n in saved.items() if ptr not in params)

    per_layer = saved_bytes(2) - saved_bytes(1)
    arch = Architecture("llama", 128, 2, 4, 2, 32, 320, 128)
    assert per_layer == 4 * layer_activation_elements(arch, tokens=24, rows=3)


def replace_layers(config, layers: int):
    config = config.__class__(**config.to_dict())
    config.num_hidden_layers = layers
    return config


def _role(arch: Architecture, name: str, kind: str = "causal_lm", trainable: bool = True, **kwargs) -> RoleSetup:
    return RoleSetup(name, arch, kind, 2, 2, trainable, **kwargs)


def test_shared_base_holds_one_base_and_three_adapters(llama3_8b):
    q = QuantizationSpec(bits=4)
    policy = _role(llama3_8b, "policy", lora=LoraSpec(r=16), quantization=q, gradient_checkpointing=True)
    reward = _role(llama3_8b, "reward_model", "sequence_classifier", trainable=False, quantization=q)
    workload = Workload("ppo", micro_batch=4, rollout_batch=16, prompt_len=256, new_tokens=128, forward_batch=4)
    separate = Run(workload, {"policy": policy, "reward_model": reward}).plan()
    shared = Run(replace(workload, shared_base=True), {"policy": policy, "reward_model": reward}).plan()
    assert [r.name for r in shared.roles] == ["policy", "reference", "critic", "reward_model"]
    base = weight_bytes(llama3_8b, "causal_lm", 2, q, trainable=True)
    assert sum(r.weights for r in shared.roles) == base  # one base, whatever the number of roles
    adapters = lora_parameters(llama3_8b, LoraSpec(r=16)) * 4
    assert shared.roles[0].adapters == adapters and shared.roles[1].adapters == 0
    assert shared.roles[2].adapters == adapters + 4096 * 4  # critic adapter + its scalar head
    assert shared.roles[3].adapters == adapters + 4096 * 4  # the RM's adapter and score head
    assert shared.peak < separate.peak


def test_checkpointing_and_micro_batch_lower_training_memory(llama3_8b):
    model = _role(llama3_8b, "model")
    workload = Workload("sft", micro_batch=8, seq_len=1024)
    full = plan_memory([model], workload)
    assert full.roles[0].activations == full.roles[0].activations_no_checkpointing
    ckpt = plan_memory([replace(model, gradient_checkpointing=True)], workload)
    assert ckpt.roles[0].activations == ckpt.roles[0].activations_checkpointing < full.roles[0].activations / 5
    half = plan_memory([model], replace(workload, micro_batch=4))
    assert half.roles[0].activations * 2 == pytest.approx(full.roles[0].activations, rel=1e-9)
    # logits [8, 1024, 128256] in bf16 and their gradient
    assert full.roles[0].logits == 2 * 8 * 1024 * 128256 * 2


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20


# ---- the command ------------------------------------------------------------------------------------------------
def _ppo_config(tmp_path: Path, policy: Path, rm: Path) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "logger": False},
        "model": {
            "class_path": "lit_rlhf.models.PPOModule",
            "init_args": {
                "policy": {"name_or_path": str(policy)},
                "critic": {"name_or_path": str(rm)},
                "reward_model": {"name_or_path": str(rm)},
                "sampling": {"max_new_tokens": 16},
                "ppo": {"micro_batch_size": 4, "num_mini_batches": 2},
            },
        },
        "data": {
            "class_path": "lit_rlhf.datamodules.PromptDataModule",
            "init_args": {"train_data": "prompts.jsonl", "max_prompt_length": 16, "batch_size": 16},
        },
    }
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_command_names_every_role_and_phase(tmp_path, tiny_model_dir, tiny_classifier_dir, capsys):
    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    assert main(["--config", str(path), "--device_memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    for role in ("policy", "reference", "critic", "reward_model"):
        assert f"| {role} |" in out
    for phase in ("generation", "scoring", "training"):
        assert f"phase {phase}:" in out
    assert "target: cpu" in out  # from trainer.accelerator
    assert "fits" in out and "NOT" not in out
    # the YAML's numbers are read: 16 prompts, 16 + 16 tokens, micro-batch 4 (an override wins)
    assert "rollout 16 prompts x (16 prompt + 16 new tokens)" in out
    assert main(["--config", str(path), "--model.init_args.ppo.micro_batch_size=2"]) == 0
    assert "training micro-batch 2" in capsys.readouterr().out


def test_verdict_and_suggestions_flip_with_device_memory(tmp_path, tiny_model_dir, tiny_classifier_dir, capsys):
    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    assert main(["--config", str(path), "--device_memory", "100MiB"]) == 0
    fits = capsys.readouterr().out
    assert ": fits" in fits and "suggestions" not in fits
    assert main(["--config", str(path), "--device_memory", "2MiB"]) == 0
    tight = capsys.readouterr().out
    assert ": does NOT fit" in tight and "suggestions:" in tight
    for change in ("micro-batch 4 -> 1", "gradient_checkpointing", "4-bit", "value head", "shared 4-bit base"):
        assert change in tight


def test_shared_base_flag(tmp_path, tiny_model_dir, tiny_classifier_dir, capsys):
    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    assert main(["--config", str(path), "--shared_base"]) == 0
    out = capsys.readouterr().out
    assert "(shared base)" in out and "runs on policy's base" in out


def test_shared_base_yaml_plans_the_reward_adapter(tmp_path, tiny_model_dir, tiny_classifier_dir, rm_adapter_dir):
    """A shared-base YAML names no reward model spec: its reward role is the reward adapter on the policy's base,
    planned as the same run given as a four-model YAML with ``--shared_base``."""
    from lit_rlhf.plan import _read_config, run_from_config

    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    lora = ["--model.init_args.policy.lora.r=4", "--model.init_args.policy.lora.alpha=8"]
    shared = [
        *lora,
        "--model.init_args.critic=null",
        "--model.init_args.reward_model=null",
        f"--model.init_args.shared_base.reward_adapter={rm_adapter_dir}",
    ]
    plan = run_from_config(*_read_config(["--config", str(path), *shared]), None, False, 2)[0].plan()
    flagged = run_from_config(*_read_config(["--config", str(path), *lora]), None, True, 2)[0].plan()
    assert [r.name for r in plan.roles] == ["policy", "reference", "critic", "reward_model"]
    reward, critic = plan.roles[3], plan.roles[2]
    assert reward.weights == 0 and reward.adapters == critic.adapters > 0 and reward.optimizer == 0
    assert plan.phases == flagged.phases


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_one_line_errors(tmp_path, tiny_model_dir, tiny_classifier_dir, capsys):
    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    # unknown architecture
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert main(["--config", str(path), f"--model.init_args.policy.name_or_path={odd}"]) == 2
    line = _error(capsys)
    assert "policy" in line and "unknown architecture 'gpt2'" in line
    # a folder without config.json
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--config", str(path), f"--model.init_args.reward_model.name_or_path={empty}"]) == 2
    line = _error(capsys)
    assert "reward_model" in line and str(empty) in line and "config.json" in line
    # an unknown model class
    assert main(["--config", str(path), "--model.class_path=lit_rlhf.models.NoSuchModule"]) == 2
    assert "NoSuchModule" in _error(capsys)


def test_critic_free_yaml_plans_k_responses_per_prompt_and_no_value_function(
    tmp_path, tiny_model_dir, tiny_classifier_dir, capsys
):
    from lit_rlhf.plan import _read_config, run_from_config

    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    config = yaml.safe_load(path.read_text())
    init = config["model"]["init_args"]
    del init["critic"]
    init["algorithm"] = {**init.pop("ppo"), "estimator": "grpo", "group_size": 4}
    config["model"]["class_path"] = "lit_rlhf.models.CriticFreeModule"
    grpo_path = tmp_path / "grpo.yaml"
    grpo_path.write_text(yaml.safe_dump(config))

    def plan(config_path: Path):
        config, module, data = _read_config(["--config", str(config_path)])
        run, _ = run_from_config(config, module, data, None, False, 2)
        return run, run.plan()

    _, ppo = plan(path)
    grpo_run, critic_free = plan(grpo_path)
    assert [r.name for r in critic_free.roles] == ["policy", "reference", "reward_model"]
    assert not any(r.value_head for r in grpo_run.roles())
    assert critic_free.kv_cache == 4 * ppo.kv_cache  # 16 prompts x K = 4 responses sampled at once
    assert main(["--config", str(grpo_path), "--device_memory", "2MiB"]) == 0
    out = capsys.readouterr().out
    assert "(critic-free)" in out and "16 prompts x 4 responses" in out
    assert "value head" not in out and "shared 4-bit base for policy, reference and reward model" in out


# ---- FSDP2: per-device memory over N devices and nodes ------------------------------------------------------------
def test_fsdp2_divides_weights_gradients_and_optimizer_and_adds_the_gathered_layers(llama3_8b):
    """Full bf16 SFT of Llama-3-8B under FSDP2 over 8 devices, by hand: each holds 1/8 of the weights, gradients
    and AdamW states, plus the root (embeddings, head, norms) and two decoder layers gathered, and one layer's
    full gradient; activations stay whole (each process runs its own micro-batch)."""
    role = RoleSetup("model", llama3_8b, "causal_lm", dtype_bytes=2, activation_bytes=2, trainable=True)
    single = plan_memory([role], Workload("sft", micro_batch=1, seq_len=1024))
    sharded = plan_memory([role], Workload("sft", micro_batch=1, seq_len=1024, shards=8))
    one, eight = single.roles[0], sharded.roles[0]
    weights = weight_bytes(llama3_8b, "causal_lm", 2)
    assert one.weights == weights and eight.weights == math.ceil(weights / 8)
    assert eight.gradients == math.ceil(weights / 8) and eight.optimizer == math.ceil(2 * weights / 8)
    assert eight.activations == one.activations and eight.logits == one.logits
    groups = llama3_8b.parameter_groups("causal_lm")
    layer = groups["linear"] // llama3_8b.num_layers * 2
    root = groups["other"] * 2
    assert eight.gathered == pytest.approx(root + 3 * layer, rel=1e-6)
    assert "FSDP2 1/8" in eight.notes
    # the training phase: the shards, the gathered units and the same activations
    expected = 4 * math.ceil(weights / 8) + eight.gathered + one.activations + one.logits
    assert sharded.phases["training"] == pytest.approx(expected, rel=1e-6)


def test_fsdp2_frozen_roles_sharded_or_replicated(llama3_8b):
    policy = RoleSetup("policy", llama3_8b, "causal_lm", 2, 2, trainable=True)
    reference = replace(policy, name="reference", trainable=False)
    workload = Workload("dpo", micro_batch=1, seq_len=512, value_function=False, shards=4)
    sharded = {p.name: p for p in plan_memory([policy, reference], workload).roles}
    replicated = {p.name: p for p in plan_memory([policy, reference], replace(workload, shard_frozen=False)).roles}
    full = weight_bytes(llama3_8b, "causal_lm", 2)
    assert sharded["reference"].weights == math.ceil(full / 4) and replicated["reference"].weights == full
    assert sharded["policy"].weights == replicated["policy"].weights == math.ceil(full / 4)


def test_fsdp2_keeps_quantized_weights_whole_on_every_device(llama3_8b):
    """QLoRA SFT of Llama-3-8B (NF4, double quantization, LoRA r=16) over 8 devices, by hand: the 4-bit linear
    layers are not sharded (FSDP2 ignores bitsandbytes weights), so each device holds all 3.60 GB of them; the
    float32 embeddings, head and norms and the adapters are divided by 8."""
    q = QuantizationSpec(bits=4, double_quant=True)
    # per decoder layer: q, o (4096 x 4096), k, v (4096 x 1024), gate, up, down (4096 x 14336), as
    # test_4bit_bytes_by_hand: n/2 + n/64 + 4·n/64/256 + the 256-entry code, the offset, the 16-entry NF4 code
    square, narrow, wide = 8_655_940, 2_097_152 + 65_536 + 1_024 + 1_092, 29_360_128 + 917_504 + 14_336 + 1_092
    whole = 32 * (2 * square + 2 * narrow + 3 * wide)
    assert quantized_linear_bytes(llama3_8b, q) == whole == 3_600_661_376  # 3.35 GiB
    other = 4 * (2 * 128256 * 4096 + (2 * 32 + 1) * 4096)  # float32 (prepare_model_for_kbit_training)
    role = RoleSetup("model", llama3_8b, "causal_lm", 2, 2, trainable=True, lora=LoraSpec(r=16), quantization=q)
    plan = plan_memory([role], Workload("sft", micro_batch=1, seq_len=1024, shards=8)).roles[0]
    assert plan.weights == whole + other // 8 == 4_126_131_072
    assert plan.adapters == plan.gradients == 41_943_040 * 4 // 8 and plan.optimizer == 2 * plan.adapters
    assert plan.gathered == other and "4-bit weights whole: 3.35 GiB" in plan.notes
    # a frozen 8-bit reward model, sharded: int8 weights and their float32 row scales whole, the bf16 rest / 8
    int8 = QuantizationSpec(bits=8)
    reward = RoleSetup("reward_model", llama3_8b, "sequence_classifier", 2, 2, trainable=False, quantization=int8)
    workload = Workload("rm", micro_batch=1, seq_len=512, shards=8)
    linear = llama3_8b.parameter_groups("sequence_classifier")["linear"]
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)  # output rows, one float32 scale each
    rest = 2 * (128256 * 4096 + 4096 + (2 * 32 + 1) * 4096)  # embeddings, score head, norms
    sharded = plan_memory([reward], workload).roles[0]
    assert sharded.weights == linear + 4 * rows + math.ceil(rest / 8)
    assert plan_memory([reward], replace(workload, shard_frozen=False)).roles[0].weights == linear + 4 * rows + rest


def test_the_command_plans_fsdp2_from_the_preset_with_devices_and_nodes(tmp_path, capsys):
    """Full bf16 SFT of an 8B model with AdamW on 24 GB devices: per device, 2 shards are not enough (16 bytes per
    parameter / 2), 4 devices × 2 nodes are; the figures are per device over devices × nodes."""
    config = {
        "trainer": {"accelerator": "gpu", "precision": "bf16-mixed", "logger": False},
        "model": {
            "class_path": "lit_rlhf.models.SFTModule",
            "init_args": {
                "model": {"name_or_path": str(LLAMA3_8B.parent), "dtype": "bfloat16", "gradient_checkpointing": True},
                "micro_batch_size": 1,
            },
        },
        "data": {"class_path": "lit_rlhf.datamodules.SFTDataModule", "init_args": {"train_data": "x.jsonl"}},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    preset = str(ROOT / "configs" / "strategies" / "fsdp2.yaml")
    assert main(["--config", str(path), "--device_memory", "24GB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["--config", str(path), "--config", preset, "--devices", "2", "--device_memory", "24GB"]) == 0
    two = capsys.readouterr().out
    assert "FSDP2 1/2" in two and "does NOT fit" in two and "FSDP2 over 2 processes" in two
    args = ["--config", str(path), "--config", preset, "--devices", "4", "--num_nodes", "2", "--device_memory", "24GB"]
    assert main(args) == 0
    eight = capsys.readouterr().out
    assert "FSDP2 1/8" in eight and ": fits" in eight
    # the preset says devices: -1 (every GPU): the planner needs the number
    assert main(["--config", str(path), "--config", preset]) == 2
    assert "--devices" in capsys.readouterr().err
    assert main(["--config", str(path), "--strategy", "fsdp2", "--devices", "2"]) == 0
    assert "FSDP2 1/2" in capsys.readouterr().out


def test_a_vllm_engine_is_counted_in_every_phase(tmp_path, tiny_model_dir, tiny_classifier_dir, capsys):
    """A colocated vLLM engine holds the policy's weights once more (in its own dtype) and its KV-cache budget in
    every phase, and generation is its own (no HF KV cache)."""
    from lit_rlhf.plan import _read_config, run_from_config
    from lit_rlhf.planning.memory import weight_bytes

    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["engine"] = {
        "class_path": "lit_rlhf.hf.vllm_engine.VLLMEngine",
        "init_args": {"kv_cache_memory_bytes": 64 * 2**20, "dtype": "bfloat16"},
    }
    vllm_path = tmp_path / "ppo_vllm.yaml"
    vllm_path.write_text(yaml.safe_dump(config))

    def plan(config_path: Path):
        config, module, data = _read_config(["--config", str(config_path)])
        run, _ = run_from_config(config, module, data, None, False, 2)
        return run, run.plan()

    run, hf = plan(path)
    _, vllm = plan(vllm_path)
    policy = next(r for r in run.roles() if r.name == "policy")
    engine = weight_bytes(policy.arch, "causal_lm", 2) + 64 * 2**20
    if policy.lora is not None:
        from lit_rlhf.planning.memory import lora_parameters

        engine += lora_parameters(policy.arch, policy.lora) * 2
    assert vllm.phases["training"] == hf.phases["training"] + engine
    assert vllm.phases["scoring"] == hf.phases["scoring"] + engine
    resident = sum(p.resident for p in hf.roles)
    assert vllm.phases["generation"] == resident + engine < hf.phases["generation"] + engine
    assert main(["--config", str(vllm_path), "--device_memory", "2MiB"]) == 0
    assert "rollout engine:" in capsys.readouterr().out


def test_a_gpu_vllm_engine_without_a_kv_budget_takes_its_utilization_of_the_device(
    tmp_path, tiny_model_dir, tiny_classifier_dir
):
    """On a GPU, vLLM fills gpu_memory_utilization x the device, less its weights, with KV-cache blocks."""
    from lit_rlhf.plan import _read_config, run_from_config
    from lit_rlhf.planning.memory import weight_bytes

    path = _ppo_config(tmp_path, tiny_model_dir, tiny_classifier_dir)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["accelerator"] = "gpu"
    config["model"]["init_args"]["engine"] = {
        "class_path": "lit_rlhf.hf.vllm_engine.VLLMEngine",
        "init_args": {"gpu_memory_utilization": 0.25, "dtype": "bfloat16"},
    }
    vllm_path = tmp_path / "ppo_vllm_gpu.yaml"
    vllm_path.write_text(yaml.safe_dump(config))
    config, module, data = _read_config(["--config", str(vllm_path)])
    device = 64 * 2**20
    run, notes = run_from_config(config, module, data, "cuda", False, 2, device_memory=device)
    policy = next(r for r in run.roles() if r.name == "policy")
    weights = weight_bytes(policy.arch, "causal_lm", 2)
    if policy.lora is not None:
        from lit_rlhf.planning.memory import lora_parameters

        weights += lora_parameters(policy.arch, policy.lora) * 2
    assert run.workload.engine_weights == weights
    assert run.workload.engine_cache == 16 * 2**20 - weights  # 0.25 x 64 MiB, less the weights
    assert any("gpu_memory_utilization=0.25 of 64.0 MiB" in n for n in notes)
    # without the device's size there is nothing to take a fraction of: not counted, and said so
    _, notes = run_from_config(config, module, data, "cuda", False, 2)
    assert any("not counted without --device_memory" in n for n in notes)
