"""RewardModule: golden losses through the module, batching invariances, normalisation, export, backbones, CLI."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForSequenceClassification

from lit_rlhf import HFExport, LoRAQuantization, LoraSpec, ModelSpec, QuantizationSpec
from lit_rlhf.callbacks.reward_normalization import (
    RewardNormalization,
    fit_reward_normalization,
    normalization_from_moments,
)
from lit_rlhf.cli import main
from lit_rlhf.datamodules.preference import PreferenceDataModule
from lit_rlhf.hf import load_model, load_tokenizer, unwrap_peft
from lit_rlhf.hf.scoring import reward_normalization, sequence_scores, set_reward_normalization
from lit_rlhf.hf.tokenization import reward_chat_ids, reward_text_ids
from lit_rlhf.models.reward import RewardModule
from lit_rlhf.quickstart.task import ranking_examples
from lit_rlhf.rlhf.padding import pad_batch
from tests.conftest import write_jsonl
from tests.helpers import cpu_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def rm_jsonl(tmp_path_factory) -> tuple[Path, Path]:
    """K=4 quickstart rankings: 32 training prompts, 8 validation prompts."""
    root = tmp_path_factory.mktemp("rm_data")
    return (
        write_jsonl(root / "train.jsonl", ranking_examples(32, seed=1)),
        write_jsonl(root / "val.jsonl", ranking_examples(8, seed=2)),
    )


def built(model_dir, **kwargs) -> RewardModule:
    module = RewardModule(ModelSpec(str(model_dir)), **kwargs)
    module.configure_model()
    return module


def preference_data(module, path, batch_size=8, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(path), batch_size=batch_size, max_length=48, **kwargs)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm


def fake_scores(module, monkeypatch, values):
    """Make the model's forward return ``values`` (one per real sequence, in batch order)."""
    scores = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(module, "forward", lambda input_ids, attention_mask, normalize=True: scores)
    return scores


# ---- test vector T7 and the loss path ------------------------------------------------------------------
def test_golden_t7_pairwise_margin_center_and_metrics(tiny_model_dir, tmp_path, monkeypatch):
    module = built(tiny_model_dir)
    rows = [
        {"prompt": "p", "chosen": f" c{i}.", "rejected": f" r{i}.", "margin": m} for i, m in enumerate([0.5, 0.0, 1.0])
    ]
    dm = preference_data(module, write_jsonl(tmp_path / "t7.jsonl", rows), batch_size=3)
    batch = dm.collate(dm.train_dataset)
    # rows of the batch: c0 r0 c1 r1 c2 r2 (test vector T7: chosen [2, .5, -1], rejected [1, 1, -3])
    fake_scores(module, monkeypatch, [2.0, 1.0, 0.5, 1.0, -1.0, -3.0])
    loss_sum, out, stats = module._loss_terms(batch)
    assert loss_sum.item() / 3 == pytest.approx(0.587139, abs=1e-6)  # with margins [0.5, 0, 1]
    no_margin = {k: v for k, v in batch.items() if k != "margin"}
    loss_sum, out, stats = module._loss_terms(no_margin)
    assert loss_sum.item() / 3 == pytest.approx(0.471422, abs=1e-6)
    torch.testing.assert_close(
        out.per_prompt_loss, torch.tensor([0.313262, 0.974077, 0.126928], dtype=torch.float64), atol=1e-6, rtol=0
    )
    step = module._update_metrics("val", stats)
    assert step["accuracy"].item() == pytest.approx(0.666667, abs=1e-6)
    assert step["margin"].item() == pytest.approx(0.833333, abs=1e-6)
    module.center_rewards_coef = 0.01
    loss_sum, _, _ = module._loss_terms(no_margin)
    assert loss_sum.item() / 3 == pytest.approx(0.562256, abs=1e-6)


def test_golden_t7_kwise_per_prompt_loss(tiny_model_dir, tmp_path, monkeypatch):
    module = built(tiny_model_dir)
    # responses listed in a shuffled order; the ranking restores best→worst = rewards [1.5, 0.3, 0.0, -0.7]
    rows = [{"prompt": "p", "responses": [" b.", " d.", " a.", " c."], "ranking": [2, 0, 3, 1]}]
    dm = preference_data(module, write_jsonl(tmp_path / "k4.jsonl", rows))
    fake_scores(module, monkeypatch, [0.3, -0.7, 1.5, 0.0])
    loss_sum, out, _ = module._loss_terms(dm.collate(dm.train_dataset))
    assert loss_sum.item() == pytest.approx(0.306764, abs=1e-6) and out.num_pairs.tolist() == [6]


def test_ties_are_dropped(tiny_model_dir, tmp_path, monkeypatch):
    module = built(tiny_model_dir)
    rows = [{"prompt": "p", "responses": [" a.", " b.", " c."], "ranking": [[0, 1], 2]}]
    dm = preference_data(module, write_jsonl(tmp_path / "tie.jsonl", rows))
    fake_scores(module, monkeypatch, [1.0, 3.0, 0.0])
    loss_sum, out, stats = module._loss_terms(dm.collate(dm.train_dataset))
    expected = (F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(-3.0))) / 2  # pairs 0>2 and 1>2 only
    assert out.num_pairs.tolist() == [2] and loss_sum.item() == pytest.approx(expected.item(), abs=1e-6)
    assert stats["correct"].item() == 2  # the tied pair (0, 1), scored 1 < 3, is not counted as wrong either


def test_kwise_at_k2_equals_pairwise_with_the_real_model(tiny_model_dir, tmp_path):
    module = built(tiny_model_dir)
    pairs = [
        {"prompt": "The movie was", "chosen": " great.", "rejected": " awful."},
        {"prompt": "The book was", "chosen": " fun and good.", "rejected": " dull."},
    ]
    ranked = [{"prompt": r["prompt"], "responses": [r["rejected"], r["chosen"]], "ranking": [1, 0]} for r in pairs]
    a = preference_data(module, write_jsonl(tmp_path / "pairs.jsonl", pairs))
    b = preference_data(module, write_jsonl(tmp_path / "ranked.jsonl", ranked))
    with torch.no_grad():
        pair_loss = module._loss_terms(a.collate(a.train_dataset))[0] / 2
        kwise_loss = module._loss_terms(b.collate(b.train_dataset))[0] / 2
        scores = [
            module(*[t.unsqueeze(0) for t in one_sequence(module.tokenizer, r["prompt"], r[k])], normalize=False)
            for r in pairs
            for k in ("chosen", "rejected")
        ]
    by_hand = F.softplus(-(torch.cat(scores[0::2]) - torch.cat(scores[1::2]))).mean()
    torch.testing.assert_close(kwise_loss, pair_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(pair_loss, by_hand, atol=1e-6, rtol=0)
    assert pair_loss.item() > 0.1


def one_sequence(tokenizer, prompt, response):
    ids = torch.tensor(reward_text_ids(tokenizer, prompt, response))
    return ids, torch.ones_like(ids)


# ---- reading the score, one forward pass ----------------------------------------------------------------
def test_score_read_at_last_real_token_under_left_and_right_padding(tiny_model_dir, rm_jsonl):
    module = built(tiny_model_dir)
    scores = {}
    for side in ("left", "right"):
        dm = preference_data(module, rm_jsonl[0], padding_side=side)
        batch = dm.collate(dm.train_dataset[:3])
        with torch.no_grad():
            scores[side] = module.score_batch(batch)
    torch.testing.assert_close(scores["left"], scores["right"], atol=1e-5, rtol=0)
    # and equal to each sequence scored alone, without any padding
    example = dm.train_dataset[2]
    with torch.no_grad():
        alone = torch.cat(
            [module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in example["input_ids"]]
        )
    torch.testing.assert_close(scores["right"][2], alone, atol=1e-5, rtol=0)
    assert scores["right"].std() > 1e-3, "different responses get different scores"


def test_a_k4_prompt_is_one_forward_pass_over_4_sequences(tiny_model_dir, rm_jsonl):
    module = built(tiny_model_dir)
    dm = preference_data(module, rm_jsonl[0])
    calls = []
    hook = unwrap_peft(module.model).register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        module._loss_terms(dm.collate(dm.train_dataset[:1]))
        module._loss_terms(dm.collate(dm.train_dataset[:3]))
    hook.remove()
    assert calls == [4, 12]


# ---- optimisation ------------------------------------------------------------------------------------
def one_step(model_dir, rm_jsonl, micro_batch_size, **spec_kwargs) -> RewardModule:
    L.seed_everything(0)
    module = RewardModule(
        ModelSpec(str(model_dir), **spec_kwargs),
        micro_batch_size=micro_batch_size,
        max_grad_norm=None,
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )
    cpu_trainer(max_steps=1).fit(module, datamodule=PreferenceDataModule(str(rm_jsonl[0]), batch_size=6, max_length=48))
    return module


def test_micro_batches_give_the_same_step_and_train_every_weight(tiny_model_dir, rm_jsonl):
    whole, split = one_step(tiny_model_dir, rm_jsonl, None), one_step(tiny_model_dir, rm_jsonl, 1)
    split_params = dict(split.model.named_parameters())
    for name, p in whole.model.named_parameters():
        torch.testing.assert_close(split_params[name], p, atol=1e-6, rtol=0)
    L.seed_everything(0)
    init = built(tiny_model_dir)  # same seed → same fresh head as before the step
    init_params = dict(init.model.named_parameters())
    changed = [n for n, p in whole.model.named_parameters() if not torch.equal(p, init_params[n])]
    assert "score.weight" in changed and len(changed) > 10


def test_fresh_head_init_std_and_an_rm_checkpoint_keeps_its_head(tiny_model_dir, tmp_path):
    module = built(tiny_model_dir)
    weight = module.model.score.weight
    assert weight.shape == (1, 64) and 0.08 < weight.std().item() < 0.17  # 1/sqrt(65) = 0.124, HF default 0.02
    module.export_hf(tmp_path / "rm")
    again = built(tmp_path / "rm", head_init_std=5.0)
    torch.testing.assert_close(again.model.score.weight, weight)


def test_lora_4bit_trains_adapters_and_head_only(tiny_model_dir, tmp_path):
    module = RewardModule(ModelSpec(str(tiny_model_dir)), optimizer=partial(torch.optim.AdamW, lr=5e-3))
    callback = LoRAQuantization(
        lora=LoraSpec(r=4, alpha=8), quantization=QuantizationSpec(bits=4, compute_dtype="float32")
    )
    # one fixed batch of 4 prompts, so the loss measured on it must go down
    dm = PreferenceDataModule(
        str(write_jsonl(tmp_path / "four.jsonl", ranking_examples(4, seed=3))), batch_size=4, max_length=48
    )
    cpu_trainer(max_steps=1, callbacks=[callback]).fit(module, datamodule=dm)  # builds the models; snapshot, train more
    assert len([m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 2 * 7
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        loss_before = module._loss_terms(batch)[0].item() / 4
    cpu_trainer(max_steps=6, callbacks=[callback]).fit(module, datamodule=dm)
    with torch.no_grad():
        loss_after = module._loss_terms(batch)[0].item() / 4
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, "4-bit base weights stay bit-identical"
    assert all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in changed) and any("lora_B" in n for n in changed)
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    # the merged export is rebuilt from the base config: the normalisation must still reach config.json
    set_reward_normalization(module.model, 0.25, 2.0)
    module.export_hf(tmp_path / "merged")
    exported = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (exported["reward_bias"], exported["reward_scale"]) == (0.25, 2.0) and "quantization_config" not in exported


def test_encoder_backbone_trains(tiny_tokenizer, tmp_path, rm_jsonl):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tiny_tokenizer.save_pretrained(tmp_path / "bert")
    module = RewardModule(ModelSpec(str(tmp_path / "bert")), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    module.configure_model()
    assert type(unwrap_peft(module.model)).__name__ == "BertForSequenceClassification"
    dm = preference_data(module, rm_jsonl[0], batch_size=16)
    batch = dm.collate(dm.train_dataset[:16])
    with torch.no_grad():
        before = module._loss_terms(batch)[0].item() / 16
    cpu_trainer(max_steps=10).fit(module, datamodule=dm)
    with torch.no_grad():
        after = module._loss_terms(batch)[0].item() / 16
    assert after < before - 0.1, (before, after)  # measured: 0.693 -> 0.46


# ---- normalisation, checkpoint, export ---------------------------------------------------------------
def test_golden_t9_normalization_from_moments():
    demo = torch.tensor([0.8, 1.4, -0.2, 2.0], dtype=torch.float64)
    moments = (4.0, demo.sum().item(), (demo**2).sum().item())
    assert normalization_from_moments(*moments, scale=False) == pytest.approx((1.0, 1.0), abs=1e-9)
    bias, scale = normalization_from_moments(*moments, scale=True)
    assert (bias, scale) == pytest.approx((1.0, 0.812404), abs=1e-6)
    expected = [-0.246183, 0.492366, -1.477098, 1.230915]  # Ziegler/OAI gain-bias to N(0, 1)
    assert ((demo - bias) / scale).tolist() == pytest.approx(expected, abs=1e-6)


def reference_scores(model, tokenizer, rows) -> torch.Tensor:
    ids = [reward_text_ids(tokenizer, r["prompt"], r["completion"]) for r in rows]
    with torch.no_grad():
        return sequence_scores(model, *pad_batch(ids, tokenizer.pad_token_id))


def test_fit_reward_normalization_mean_0_and_std_1(tiny_model_dir, sft_jsonl):
    module = built(tiny_model_dir)
    rows = [json.loads(line) for line in sft_jsonl[0].read_text().splitlines()]
    prompts, responses = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    raw_mean = reference_scores(module.model, module.tokenizer, rows).mean().item()
    bias, _ = fit_reward_normalization(module, module.tokenizer, prompts, responses, batch_size=16)
    assert bias == pytest.approx(raw_mean, abs=1e-5) and abs(raw_mean) > 1e-3
    assert abs(reference_scores(module.model, module.tokenizer, rows).mean().item()) < 1e-4
    fit_reward_normalization(module.model, module.tokenizer, prompts, responses, batch_size=7, scale=True)
    scores = reference_scores(module.model, module.tokenizer, rows).double()
    assert abs(scores.mean().item()) < 1e-4 and scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_normalization_travels_with_export_and_checkpoint(tiny_model_dir, rm_jsonl, sft_jsonl, tmp_path):
    module = RewardModule(ModelSpec(str(tiny_model_dir)), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    export, ckpts = tmp_path / "export", tmp_path / "ckpt"
    callbacks = [  # HFExport listed first on purpose: RewardNormalization must still run before it
        HFExport(str(export)),
        RewardNormalization(str(sft_jsonl[0]), batch_size=16),
        L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=0),
    ]
    t = cpu_trainer(max_steps=2, callbacks=callbacks, enable_checkpointing=True)
    t.fit(module, datamodule=PreferenceDataModule(str(rm_jsonl[0]), batch_size=8, max_length=48))
    bias, scale = reward_normalization(module.model)
    assert bias == callbacks[1].bias and scale == 1.0 and abs(bias) > 1e-3
    rows = [json.loads(line) for line in sft_jsonl[0].read_text().splitlines()]
    trained = reference_scores(module.model, module.tokenizer, rows)
    assert abs(trained.mean().item()) < 1e-4
    # the export, through the loading path ...
    tokenizer = load_tokenizer(str(export))
    reloaded = load_model(ModelSpec(str(export)), tokenizer, "sequence_classifier", trainable=False)
    torch.testing.assert_close(reference_scores(reloaded, tokenizer, rows), trained, atol=1e-5, rtol=0)
    # ... and through plain transformers: HF pools at the last non-pad token; subtract the stored bias
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert plain.config.reward_bias == pytest.approx(bias)
    ids = [reward_text_ids(tokenizer, r["prompt"], r["completion"]) for r in rows[:8]]
    with torch.no_grad():
        input_ids, attention_mask = pad_batch(ids, tokenizer.pad_token_id)
        logits = plain(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(logits - plain.config.reward_bias, trained[:8], atol=1e-5, rtol=0)
    # the last checkpoint was re-saved after normalising; a resumed module gets the bias back
    checkpoint = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert checkpoint["reward_normalization"] == {"bias": bias, "scale": 1.0}
    resumed = built(tiny_model_dir)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=False)
    assert reward_normalization(resumed.model) == (bias, 1.0)
    torch.testing.assert_close(reference_scores(resumed.model, module.tokenizer, rows), trained, atol=1e-5, rtol=0)


# ---- CLI: fit the quickstart config on tiny data, then predict -----------------------------------------
def test_cli_fit_quickstart_config_then_predict(tiny_model_dir, rm_jsonl, sft_jsonl, tmp_path):
    run = tmp_path / "run"
    override = {
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 3,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0},
                },
                {
                    "class_path": "lit_rlhf.callbacks.RewardNormalization",
                    "init_args": {"reference_data": str(sft_jsonl[0])},
                },
                {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}},
            ],
        },
        "model": {"init_args": {"model": {"name_or_path": str(tiny_model_dir)}, "micro_batch_size": 4}},
        "data": {"init_args": {"train_data": str(rm_jsonl[0]), "val_data": str(rm_jsonl[1]), "batch_size": 8}},
    }
    config = tmp_path / "override.yaml"
    config.write_text(yaml.safe_dump(override))
    main(["fit", "--config", str(ROOT / "configs/quickstart/rm.yaml"), "--config", str(config)])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    exported = json.loads((run / "export" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"] and "reward_bias" in exported
    metrics = next(run.rglob("metrics.csv")).read_text()
    assert "val/accuracy" in metrics and "reward_norm/bias" in metrics

    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "The movie was", "response": " great fun.", "id": 1},
            {"prompt": "The book was", "response": " awful and dull.", "id": 2},
        ],
    )
    scores_path = tmp_path / "scores.jsonl"
    writer = {
        "class_path": "lit_rlhf.callbacks.JsonlPredictionWriter",
        "init_args": {"output_path": str(scores_path), "key": "score"},
    }
    main(
        [
            "predict",
            "--config",
            str(ROOT / "configs/quickstart/rm.yaml"),
            "--config",
            str(config),
            "--model.init_args.model.name_or_path",
            str(run / "export"),
            "--data.init_args.predict_data",
            str(pairs),
            "--trainer.callbacks",
            json.dumps([writer]),
            "--trainer.logger=false",
        ]
    )
    written = [json.loads(line) for line in scores_path.read_text().splitlines()]
    assert [w["id"] for w in written] == [1, 2]
    tokenizer = load_tokenizer(str(run / "export"))
    model = load_model(ModelSpec(str(run / "export")), tokenizer, "sequence_classifier", trainable=False)
    expected = [model_score(model, tokenizer, w["prompt"], w["response"]) for w in written]
    assert [w["score"] for w in written] == pytest.approx(expected, abs=1e-5)

    # `test` on the validation rankings, resuming the module from the last checkpoint (normalisation included)
    cli = main(
        [
            "test",
            "--config",
            str(ROOT / "configs/quickstart/rm.yaml"),
            "--config",
            str(config),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--trainer.logger=false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= metrics["test/accuracy"].item() <= 1.0 and metrics["test/reward_std"].item() > 0
    assert reward_normalization(cli.model.model)[0] == pytest.approx(exported["reward_bias"])


def model_score(model, tokenizer, prompt, response) -> float:
    ids, mask = one_sequence(tokenizer, prompt, response)
    with torch.no_grad():
        return sequence_scores(model, ids[None], mask[None]).item()


def test_reference_rows_build_the_rm_sequences_text_and_chat(tiny_tokenizer, tmp_path):

    chat = [{"role": "user", "content": "Rate it"}, {"role": "assistant", "content": "great"}]
    path = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "The movie was", "completion": " fun."}, {"messages": chat}])
    sequences = RewardNormalization(str(path)).reference_sequences(tiny_tokenizer)
    assert sequences == [
        reward_text_ids(tiny_tokenizer, "The movie was", " fun."),
        reward_chat_ids(tiny_tokenizer, chat[:1], chat[1:]),
    ]
    assert RewardNormalization(str(path), max_samples=1).reference_sequences(tiny_tokenizer) == sequences[:1]


def test_score_moments_keeps_step_with_the_busiest_process(tiny_classifier_dir):
    """Under FSDP every process must run as many forwards as the busiest: extra forwards on the filler rows leave
    the moments unchanged (bit for bit), and a process with no rows of its own still runs them."""
    from lit_rlhf.callbacks.reward_normalization import score_moments

    tokenizer = load_tokenizer(str(tiny_classifier_dir))
    model = load_model(ModelSpec(str(tiny_classifier_dir)), tokenizer, "sequence_classifier", trainable=False)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    rows = [tokenizer("the movie was great")["input_ids"], tokenizer("awful")["input_ids"]]
    pad = tokenizer.pad_token_id
    plain = score_moments(model, pad, rows, batch_size=1)
    assert len(calls) == 2 and plain[0] == 2
    calls.clear()
    padded = score_moments(model, pad, rows, batch_size=1, min_batches=4)
    assert len(calls) == 4 and torch.equal(padded, plain)
    calls.clear()
    idle = score_moments(model, pad, [], batch_size=1, min_batches=2, filler=rows[:1])
    assert len(calls) == 2 and torch.equal(idle, torch.zeros(3, dtype=torch.float64))
