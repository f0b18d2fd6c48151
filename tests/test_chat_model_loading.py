"""Chat models whose tokenizer has no pad token (Llama 3) or pad = EOS (Mistral-like), with no spare embedding
row, load and keep their original rows; the reward-model card's snippet runs (issue 20, items 1 and 8)."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
from lit_rlhf.quickstart.task import corpus


@pytest.fixture(scope="module", params=["llama3", "pad_eos"])
def base(request, tmp_path_factory):
    tok = build_tokenizer(corpus(seed=0, n=200), vocab_size=300, family=request.param)
    path = build_tiny_llama(tmp_path_factory.mktemp(request.param), tok)
    return path, len(tok)


@pytest.mark.parametrize("kind", ["causal_lm", "sequence_classifier"])
def test_pad_added_without_spare_row_loads_and_keeps_rows(base, kind, tmp_path):
    path, rows = base
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach().clone()
    assert original.shape[0] == rows
    spec = ModelSpec(name_or_path=str(path))
    tok = load_tokenizer(spec)
    assert tok.pad_token_id != tok.eos_token_id
    model = load_model(spec, tok, kind=kind)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tok) == rows + 1
    torch.testing.assert_close(weight[:rows], original, rtol=0, atol=0)
    torch.testing.assert_close(weight[rows], original.mean(0), rtol=0, atol=1e-6)
    assert model.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[1, 2, 3, tok.eos_token_id, tok.pad_token_id]])
    out = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long())
    out.logits.sum().backward()  # a training step's backward runs
    if kind == "causal_lm":
        save_pretrained_atomic(model, tok, tmp_path / "export", spec)
        spec2 = ModelSpec(name_or_path=str(tmp_path / "export"))
        tok2 = load_tokenizer(spec2)
        assert len(tok2) == len(tok) and tok2.pad_token_id == tok.pad_token_id
        again = load_model(spec2, tok2, trainable=False)
        assert again.get_input_embeddings().weight.shape[0] == len(tok2)
        torch.testing.assert_close(again.get_input_embeddings().weight, weight.detach(), rtol=0, atol=0)
        assert again.config.pad_token_id == tok.pad_token_id


def test_reward_model_card_snippet_runs_and_matches(base, tmp_path):
    import re
    import subprocess
    import sys

    from lit_rlhf.hf.reward import reward_model_card

    path, _ = base
    spec = ModelSpec(name_or_path=str(path))
    tok = load_tokenizer(spec)
    model = load_model(spec, tok, kind="sequence_classifier", trainable=False)
    model.config.reward_bias, model.config.reward_scale = 0.25, 2.0
    card = reward_model_card(model, tok, base=str(path), training="test")
    out = save_pretrained_atomic(model, tok, tmp_path / "rm", spec, kind="sequence_classifier", model_card=card)
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    printed = [float(x) for x in run.stdout.split()]

    with torch.no_grad():
        p = tok("The phone was", add_special_tokens=True)["input_ids"]
        r = tok(" great, I loved it.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logit = model(input_ids=torch.tensor([p + r])).logits[0, 0].item()
    assert printed[0] == pytest.approx((logit - 0.25) / 2.0, abs=1e-5)
    assert len(printed) == 2  # the chat example ran too
