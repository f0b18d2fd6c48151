"""SFTModule: the loss is a token mean over the optimizer step, LoRA/4-bit train what they should, exports reload."""

from __future__ import annotations

from functools import partial

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_rlhf import (
    HFExport,
    LoRAQuantization,
    LoraSpec,
    ModelSpec,
    QuantizationSpec,
    SFTDataModule,
    SFTModule,
)
from lit_rlhf.hf import load_model, load_tokenizer
from lit_rlhf.models import WarmupCosineLR
from lit_rlhf.rlhf import IGNORE_INDEX
from tests.helpers import cpu_trainer


def sft_data(sft_jsonl, batch_size=8) -> SFTDataModule:
    return SFTDataModule(str(sft_jsonl[0]), val_data=str(sft_jsonl[1]), batch_size=batch_size, max_length=48)


def built_module(model_dir, **kwargs) -> SFTModule:
    module = SFTModule(ModelSpec(str(model_dir)), **kwargs)
    module.configure_model()
    return module


def test_loss_equals_hand_computed_token_mean(tiny_model_dir, sft_jsonl):
    module = built_module(tiny_model_dir)
    dm = sft_data(sft_jsonl)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = dm.collate(dm.train_dataset[:4])
    nll_sum, num_tokens, _ = module._nll_and_correct(batch)
    logits = module(batch["input_ids"], batch["attention_mask"])
    losses = []
    for i in range(4):
        for t in range(batch["input_ids"].shape[1] - 1):
            label = int(batch["labels"][i, t + 1])
            if label != IGNORE_INDEX:
                losses.append(-torch.log_softmax(logits[i, t].double(), -1)[label])
    assert int(num_tokens) == len(losses)
    torch.testing.assert_close(nll_sum.double() / num_tokens, torch.stack(losses).mean(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batching_gives_the_same_step_as_one_batch(tiny_model_dir, sft_jsonl, micro_batch_size):
    def one_step(mbs):
        L.seed_everything(0)
        module = SFTModule(
            ModelSpec(str(tiny_model_dir)),
            micro_batch_size=mbs,
            max_grad_norm=None,
            optimizer=partial(torch.optim.SGD, lr=1.0),
        )
        cpu_trainer(max_steps=1).fit(module, datamodule=sft_data(sft_jsonl, batch_size=8))
        return {n: p.detach().clone() for n, p in module.model.named_parameters()}

    whole, split = one_step(8), one_step(micro_batch_size)
    for name, p in whole.items():
        torch.testing.assert_close(split[name], p, atol=1e-6, rtol=0)
    init = load_model(ModelSpec(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    changed = [n for n, p in init.named_parameters() if not torch.allclose(p, whole[n])]
    assert len(changed) > 10, "an SGD step with lr=1 must move the weights"


def test_lora_trains_only_adapters_and_checkpoints_hold_only_them(tiny_model_dir, sft_jsonl, tmp_path):
    module = SFTModule(ModelSpec(str(tiny_model_dir)), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    callback = LoRAQuantization(lora=LoraSpec(r=4, alpha=8))
    t = cpu_trainer(max_steps=3, callbacks=[callback])
    t.fit(module, datamodule=sft_data(sft_jsonl))
    base = load_model(ModelSpec(str(tiny_model_dir)), module.tokenizer)
    base_state = base.state_dict()
    for name, p in module.model.named_parameters():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad
            assert torch.equal(p, base_state[key]), f"frozen base weight {key} changed"
    lora_b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "lora_B starts at zero and must have trained"

    ckpt = tmp_path / "lora.ckpt"
    t.save_checkpoint(ckpt)
    keys = torch.load(ckpt, weights_only=True)["state_dict"].keys()
    # besides the adapter, only the running sums of the epoch's metrics (so a resumed epoch's mean is whole)
    weights = [k for k in keys if not k.startswith(("train_loss.", "skipped_steps."))]
    assert weights and all("lora_" in k for k in weights)
    assert set(keys) - set(weights) == {"train_loss.mean_value", "train_loss.weight", "skipped_steps.sum_value"}

    resumed = SFTModule(ModelSpec(str(tiny_model_dir), lora=LoraSpec(r=4, alpha=8)))
    resumed.configure_model()
    resumed.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"], strict=False)
    for (n, p), (_, q) in zip(module.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


def test_four_bit_layers_and_loss_goes_down(tiny_model_dir, sft_jsonl):
    spec = ModelSpec(
        str(tiny_model_dir),
        quantization=QuantizationSpec(bits=4, compute_dtype="float32"),
        lora=LoraSpec(r=8, alpha=16),
    )
    module = SFTModule(spec, optimizer=partial(torch.optim.AdamW, lr=2e-2))
    module.configure_model()
    linear4 = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q, k, v, o, gate, up, down per layer
    dm = sft_data(sft_jsonl, batch_size=16)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = dm.collate(dm.train_dataset[:16])

    def loss():
        with torch.no_grad():
            nll, n, _ = module._nll_and_correct(batch)
        return float(nll / n)

    before = loss()
    cpu_trainer(max_steps=8).fit(module, datamodule=dm)
    after = loss()
    assert after < before - 0.3, (before, after)


def test_export_reloads_and_generates(tiny_model_dir, sft_jsonl, tmp_path):
    module = SFTModule(ModelSpec(str(tiny_model_dir)))
    export = tmp_path / "export"
    cpu_trainer(max_steps=1, callbacks=[HFExport(str(export))]).fit(module, datamodule=sft_data(sft_jsonl))
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("The movie was", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, module.model(**ids).logits, atol=1e-5, rtol=0)
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (export / "model.safetensors").exists()
    assert not list(tmp_path.glob(".export.*")), "no temporary folder left behind"


def test_merged_lora_export_equals_adapted_model(tiny_model_dir, sft_jsonl, tmp_path):
    module = SFTModule(ModelSpec(str(tiny_model_dir)), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    cpu_trainer(max_steps=2, callbacks=[LoRAQuantization(lora=LoraSpec(r=4))]).fit(
        module, datamodule=sft_data(sft_jsonl)
    )
    module.export_hf(tmp_path / "merged")
    module.export_hf(tmp_path / "adapter", merge_adapters=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = module.tokenizer("The book was", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, module.model(**ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_pad_token_is_added_when_missing_or_equal_to_eos(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "tok")
    spec = ModelSpec(str(tiny_model_dir), tokenizer=str(tmp_path / "tok"))
    fixed = load_tokenizer(spec)
    assert fixed.pad_token == "<|pad|>" and fixed.pad_token_id != fixed.eos_token_id
    model = load_model(spec, fixed)
    assert model.get_input_embeddings().num_embeddings >= len(fixed)
    assert model.config.pad_token_id == fixed.pad_token_id


def test_dropout_is_overridden(tiny_model_dir):
    model = load_model(ModelSpec(str(tiny_model_dir), dropout=0.3), load_tokenizer(str(tiny_model_dir)))
    assert model.config.attention_dropout == 0.3
    assert all(m.attention_dropout == 0.3 for m in model.modules() if hasattr(m, "attention_dropout"))


def test_plain_python_use_in_an_existing_project(tiny_model_dir, sft_jsonl):
    module = SFTModule(ModelSpec(str(tiny_model_dir)), micro_batch_size=4)
    t = cpu_trainer(max_epochs=1, limit_val_batches=1.0)
    t.fit(module, datamodule=sft_data(sft_jsonl))
    assert t.global_step == 8  # 64 examples / batch 8, one optimizer step per batch
    assert "val/loss" in t.callback_metrics and "val/perplexity" in t.callback_metrics
    torch.testing.assert_close(t.callback_metrics["val/perplexity"], t.callback_metrics["val/loss"].exp())


def test_trainer_accumulation_is_refused_with_a_clear_error(tiny_model_dir, sft_jsonl):
    with pytest.raises(Exception, match="accumulation"):
        cpu_trainer(max_steps=1, accumulate_grad_batches=2).fit(
            SFTModule(ModelSpec(str(tiny_model_dir))), datamodule=sft_data(sft_jsonl)
        )


def test_warmup_cosine_schedule_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))
    assert lrs[13] == pytest.approx(0.1)
