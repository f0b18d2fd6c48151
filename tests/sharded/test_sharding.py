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


def test_shard_roles_skips_what_is_not_a_transformers_model_and_refuses_quantized_ones(tiny_model_dir):
    import torch

    from lit_rlhf.hf.sharding import shard_roles

    # nothing to shard: no mesh is touched
    assert shard_roles({"reference": None, "critic": torch.nn.Linear(2, 1)}, mesh=None) == []
    spec = ModelSpec(str(tiny_model_dir))
    model = load_model(spec, load_tokenizer(spec), "causal_lm", trainable=False)
    model.hf_quantizer = object()  # what transformers sets on a 4/8-bit model
    assert shard_roles({"reference": model}, mesh=None, frozen_roles="replicate") == []  # kept whole: allowed
    with pytest.raises(ConfigError, match="reference: a 4/8-bit model cannot be sharded"):
        shard_roles({"reference": model}, mesh=None)
