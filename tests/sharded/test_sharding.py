"""lit_rlhf.hf.sharding in one process: which layers are sharded, which strategies are refused."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lit_rlhf.errors import ConfigError
from lit_rlhf.hf import LoraSpec, ModelSpec, load_model, load_tokenizer
from lit_rlhf.hf.sharding import FSDP2Strategy, check_strategy, decoder_layers


def test_the_decoder_layers_of_a_causal_lm_a_lora_model_and_a_classifier(tiny_model_dir):
    spec = ModelSpec(str(tiny_model_dir))
    tokenizer = load_tokenizer(spec)
    plain = load_model(spec, tokenizer, "causal_lm", trainable=True)
    assert decoder_layers(plain) == list(plain.model.layers) and len(plain.model.layers) == 2
    lora = load_model(ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4)), tokenizer, "causal_lm", trainable=True)
    layers = decoder_layers(lora)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert layers == list(lora.get_base_model().model.layers)
    assert any("lora_A" in n for n, _ in layers[0].named_parameters()), "the adapters are sharded with their layer"
    classifier = load_model(spec, tokenizer, "sequence_classifier", trainable=True, new_head=True)
    assert decoder_layers(classifier) == list(classifier.model.layers)


def test_fsdp1_and_deepspeed_are_refused_in_one_line_pointing_to_the_fsdp2_preset():
    with pytest.raises(ConfigError, match=r"#19626.*configs/strategies/fsdp2.yaml"):
        check_strategy(FSDPStrategy.__new__(FSDPStrategy), max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=r"max_grad_norm=1.0 would be ignored.*configs/strategies/fsdp2.yaml"):
        check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy), max_grad_norm=1.0)
    check_strategy(FSDP2Strategy(), max_grad_norm=1.0)  # accepted


def test_fsdp2_strategy_options_are_checked():
    with pytest.raises(ConfigError, match="mixed_precision"):
        FSDP2Strategy(mixed_precision="bfloat16")
    with pytest.raises(ConfigError, match="frozen_roles"):
        FSDP2Strategy(frozen_roles="offload")
    strategy = FSDP2Strategy(mixed_precision="bf16", frozen_roles="replicate", timeout_s=60)
    assert strategy._timeout.total_seconds() == 60 and strategy._tensor_parallel_size == 1


def test_the_strategy_has_a_name():
    import lightning as L

    trainer = L.Trainer(strategy="fsdp2", accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is FSDP2Strategy


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone and its 1-D mesh (FSDP2 on one process: shards of one)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bits", [4, 8])
def test_shard_roles_keeps_quantized_weights_whole_and_shards_the_rest(tiny_model_dir, one_process_group, bits):
    """A QLoRA policy and a frozen 4/8-bit reward model are sharded: every bitsandbytes weight stays a plain
    ``Params4bit`` / ``Int8Params`` (FSDP2 ignores it: whole on every process), every other weight becomes a
    DTensor; what is not a transformers model is skipped."""
    import bitsandbytes as bnb
    import torch

    from lit_rlhf.hf import QuantizationSpec
    from lit_rlhf.hf.loading import is_quantized, quantized_params
    from lit_rlhf.hf.sharding import is_dtensor, shard_roles

    assert shard_roles({"reference": None, "critic": torch.nn.Linear(2, 1)}, mesh=None) == []  # no mesh touched
    q = QuantizationSpec(bits=bits, compute_dtype="float32")
    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dir)))
    policy = load_model(ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4), quantization=q), tokenizer, "causal_lm")
    reward = load_model(ModelSpec(str(tiny_model_dir), quantization=q), tokenizer, "sequence_classifier", False)
    plain = load_model(ModelSpec(str(tiny_model_dir)), tokenizer, "causal_lm", trainable=False)
    assert is_quantized(policy) and is_quantized(reward) and not is_quantized(plain) and not quantized_params(plain)
    kind = bnb.nn.Params4bit if bits == 4 else bnb.nn.Int8Params
    before = {id(p): p.detach().clone() for p in quantized_params(policy) | quantized_params(reward)}

    roles = {"policy": policy, "reward_model": reward, "critic": torch.nn.Linear(2, 1)}
    assert shard_roles(roles, one_process_group) == ["policy", "reward_model"]
    for model in (policy, reward):
        quantized = quantized_params(model)
        assert len(quantized) == 2 * 7 and all(type(p) is kind for p in quantized)  # q k v o gate up down
        assert all(torch.equal(p, before[id(p)]) for p in quantized)
        rest = [n for n, p in model.named_parameters() if p not in quantized]
        assert rest and all(is_dtensor(p) for n, p in model.named_parameters() if n in rest), rest
    assert any("lora_A" in n for n, p in policy.named_parameters() if is_dtensor(p))
    # what a distributed checkpoint saves (the whole module's sharded state dict, read key by key through
    # torch.distributed.checkpoint): the 8-bit layers' SCB / weight_format keys resolve once shard_roles named them
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from lit_rlhf.hf.sharding import full_state_dict

    sharded = get_model_state_dict(torch.nn.ModuleDict(roles))
    assert all(is_dtensor(v) for k, v in sharded.items() if "lora_" in k)
    # the gathered state dict holds the quantized layers as stored (bytes + quantization state, int8 + scales)
    state = full_state_dict(reward)
    key = next(k for k in reward.state_dict() if k.endswith("q_proj.weight"))
    assert torch.equal(state[key], reward.state_dict()[key])
    extra = "SCB" if bits == 8 else "weight.absmax"
    assert any(k.endswith(f"q_proj.{extra}") for k in state), sorted(state)[:8]
    assert any(k.endswith(f"q_proj.{extra}") for k in sharded)
