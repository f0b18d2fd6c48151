"""Memory arithmetic of SFT, reward-model, DPO and policy-gradient runs: pure functions of the model shapes and the
run settings.

Nothing here loads a weight or touches a device; every figure is in bytes. The constants of the activation
formula were measured on Llama-shaped decoders (``benchmarks/plan_check.py``; docs/conventions.md#memory-planning)
and the whole model is checked against measured peaks in ``benchmarks/README.md``.

Shapes: ``B`` rows per forward pass, ``T`` tokens per row, ``P`` prompt tokens, ``N`` new tokens, ``V`` vocabulary,
``H`` hidden size, ``I`` MLP width, ``L`` decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lit_rlhf.hf.specs import LoraSpec, QuantizationSpec

GiB = 2**30
#: Llama-shaped decoders the planner knows (config.json ``model_type``)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: bitsandbytes 4-bit: 64 weights share one absmax; double quantization groups 256 absmax values
BNB_BLOCKSIZE, BNB_NESTED_BLOCKSIZE = 64, 256
#: Activations saved per decoder layer and token, in elements (measured with saved-tensor hooks on HF Llama,
#: sdpa attention, fp32): ``8·H + 4·I + 2·(kv heads · head dim) + heads + 2``.
ACT_HIDDEN, ACT_MLP, ACT_KV = 8, 4, 2
#: Saved outside the layers, per token (embedding output, final norm), in elements of H
ACT_OUTSIDE = 2
#: Live elements per token of a no-grad layer forward at its widest point (inside the MLP), in units of H and I
NO_GRAD_HIDDEN, NO_GRAD_MLP = 2, 3
#: Eager attention keeps the attention probabilities (and their pre-softmax scores) per layer: ``2·B·heads·T²``.
#: sdpa / flash attention keep none.
ACT_EAGER_SCORES = 2
#: Reserve on a GPU for the CUDA context, cuBLAS workspaces and allocator fragmentation.
CUDA_OVERHEAD = 1 * GiB
#: On CPU the peak is the growth of the process's RSS, which also holds what a ``fit`` run allocates besides
#: tensors (Trainer, data, tokenizer, kernel scratch): 31-37 MiB measured with a 0.2M-parameter model
#: (``python -m benchmarks.plan_check --sizes 0.2M``).
CPU_OVERHEAD = 35 * 2**20

Kind = Literal["causal_lm", "sequence_classifier"]
Stage = Literal["sft", "rm", "dpo", "ppo"]
Target = Literal["cuda", "cpu"]


class PlanError(ValueError):
    """A configuration the planner cannot read (unknown architecture, model class...)."""


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-shaped decoder, from its ``config.json``."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config: Any, name: str = "model") -> Architecture:
        """From a transformers ``PretrainedConfig`` (or any object with its attributes)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise PlanError(
                f"{name}: unknown architecture {model_type!r} (config.json model_type); "
                f"the planner knows {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",  # Qwen2 always has q/k/v biases
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """``(name, in_features, out_features, bias)`` of the linear layers of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return [
            ("q_proj", h, self.q_dim, self.qkv_bias),
            ("k_proj", h, self.kv_dim, self.qkv_bias),
            ("v_proj", h, self.kv_dim, self.qkv_bias),
            ("o_proj", self.q_dim, h, self.o_bias),
            ("gate_proj", h, i, self.mlp_bias),
            ("up_proj", h, i, self.mlp_bias),
            ("down_proj", i, h, self.mlp_bias),
        ]

    def parameter_groups(self, kind: Kind) -> dict[str, int]:
        """Parameter counts: ``linear`` (decoder-layer weight matrices, the quantizable part) and ``other``
        (embeddings, output head, norms, biases), for a causal LM or a scalar-head sequence classifier."""
        h, layers = self.hidden_size, self.num_layers
        linear = layers * sum(fan_in * fan_out for _, fan_in, fan_out, _ in self.linears())
        biases = layers * sum(fan_out for _, _, fan_out, bias in self.linears() if bias)
        norms = (2 * layers + 1) * h + (2 * layers * self.head_dim if self.qk_norm else 0)
        embedding = self.vocab_size * h
        if kind == "causal_lm":
            head = 0 if self.tie_word_embeddings else self.vocab_size * h
        else:
            head = h  # the scalar score head (num_labels = 1, no bias)
        return {"linear": linear, "other": embedding + head + norms + biases}

    def num_parameters(self, kind: Kind = "causal_lm") -> int:
        return sum(self.parameter_groups(kind).values())


def quantized_4bit_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit weight tensor of ``numel`` elements, quantization constants included.

    Two 4-bit values per byte; one absmax per block of 64 weights (float32, or uint8 with double quantization,
    whose 256-block second level adds a float32 absmax per group, the 256-entry float32 code and an offset);
    the 16-entry float32 NF4/FP4 code table. (bitsandbytes ``QuantState``, blocksize 64.)
    """
    blocks = math.ceil(numel / BNB_BLOCKSIZE)
    total = math.ceil(numel / 2) + 16 * 4
    if double_quant:
        total += blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 256 * 4 + 4
    else:
        total += 4 * blocks
    return total


def weight_bytes(
    arch: Architecture,
    kind: Kind,
    dtype_bytes: int,
    quantization: QuantizationSpec | None = None,
    trainable: bool = False,
) -> int:
    """Bytes of a model's weights.

    Quantized models keep the embeddings, the output head (transformers never converts it), norms and biases
    unquantized; for a model that trains (QLoRA), peft's ``prepare_model_for_kbit_training`` casts those to
    float32.
    """
    groups = arch.parameter_groups(kind)
    if quantization is None:
        return (groups["linear"] + groups["other"]) * dtype_bytes
    other_bytes = 4 if trainable else dtype_bytes
    return quantized_linear_bytes(arch, quantization) + groups["other"] * other_bytes


def quantized_linear_bytes(arch: Architecture, quantization: QuantizationSpec) -> int:
    """Bytes of a quantized model's bitsandbytes weights: the linear layers of every decoder layer, quantization
    constants included (4-bit: :func:`quantized_4bit_bytes`; LLM.int8: one byte per weight plus a float32 scale
    per output row). Under FSDP2 these are not sharded: every process holds them whole (:func:`shard_role`)."""
    matrices = [(fan_in * fan_out, fan_out) for _, fan_in, fan_out, _ in arch.linears()]
    if quantization.bits == 4:
        linear = sum(quantized_4bit_bytes(n, quantization.double_quant) for n, _ in matrices)
    else:
        linear = sum(n + 4 * fan_out for n, fan_out in matrices)
    return arch.num_layers * linear


def lora_parameters(arch: Architecture, lora: LoraSpec) -> int:
    """Adapter parameters: ``r·(in + out)`` for every adapted linear layer of every decoder layer.

    ``all-linear`` adapts every linear layer except the output head (peft); a list adapts the layers whose name
    it holds.
    """
    targets = lora.target_modules
    chosen = [
        (fan_in, fan_out)
        for name, fan_in, fan_out, _ in arch.linears()
        if targets == "all-linear" or (isinstance(targets, str) and targets == name) or name in targets
    ]
    return arch.num_layers * sum(lora.r * (fan_in + fan_out) for fan_in, fan_out in chosen)


def kv_cache_bytes(arch: Architecture, batch: int, tokens: int, dtype_bytes: int) -> int:
    """Generation KV cache: ``2 (K and V) · L · kv_heads · head_dim · B · (P + N) · bytes``."""
    return 2 * arch.num_layers * arch.kv_dim * batch * tokens * dtype_bytes


def layer_activation_elements(arch: Architecture, tokens: int, rows: int, eager_attention: bool = False) -> int:
    """Elements one decoder layer saves for the backward pass (no checkpointing), for ``rows × tokens``."""
    per_token = ACT_HIDDEN * arch.hidden_size + ACT_MLP * arch.intermediate_size + ACT_KV * arch.kv_dim
    per_token += arch.num_heads + 2
    scores = ACT_EAGER_SCORES * arch.num_heads * tokens * tokens * rows if eager_attention else 0
    return rows * tokens * per_token + scores


def activation_bytes(
    arch: Architecture, rows: int, tokens: int, element_bytes: int, checkpointing: bool, eager_attention: bool = False
) -> int:
    """Activations a training forward keeps until its backward pass, for ``rows × tokens``.

    Without checkpointing every layer keeps :func:`layer_activation_elements`; with it, each layer keeps only
    its input ``[B, T, H]`` and one layer's activations are rebuilt at a time during the backward pass.
    """
    layer = layer_activation_elements(arch, tokens, rows, eager_attention)
    outside = ACT_OUTSIDE * rows * tokens * arch.hidden_size
    if checkpointing:
        return (arch.num_layers * rows * tokens * arch.hidden_size + layer + outside) * element_bytes
    return (arch.num_layers * layer + outside) * element_bytes


def no_grad_forward_bytes(arch: Architecture, rows: int, tokens: int, element_bytes: int, hidden_states: bool) -> int:
    """Working memory of a no-grad forward: the widest point of one layer, plus every layer's hidden states
    ``[B, T, H]`` when they are returned (``output_hidden_states``: value heads, critics, reward models)."""
    widest = NO_GRAD_HIDDEN * arch.hidden_size + NO_GRAD_MLP * arch.intermediate_size
    kept = (arch.num_layers + 1) * arch.hidden_size if hidden_states else 0
    return rows * tokens * (widest + kept) * element_bytes


@dataclass(frozen=True)
class RoleSetup:
    """One model role as the run builds it.

    Args:
        name: ``model`` (SFT, RM) or ``policy``/``reference``/``critic``/``reward_model`` (PPO).
        arch: its shape. kind: causal LM or scalar-head classifier.
        dtype_bytes: bytes per weight (``ModelSpec.dtype``). activation_bytes: bytes per activation element
            (2 under 16-bit precision or a 16-bit compute dtype).
        trainable: whether the run trains it. lora, quantization, gradient_checkpointing: as in ``ModelSpec``.
        value_head: carries a scalar value head (PPO ``value_head: true``).
        shares_base_with: holds no weights of its own: it runs on this role's base (a LoRA policy's reference,
            or every role of a shared base).
        eager_attention: ``attn_implementation: eager`` (keeps ``[B, heads, T, T]`` attention probabilities).
    """

    name: str
    arch: Architecture
    kind: Kind
    dtype_bytes: int
    activation_bytes: int
    trainable: bool
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    gradient_checkpointing: bool = False
    value_head: bool = False
    shares_base_with: str | None = None
    eager_attention: bool = False


@dataclass(frozen=True)
class Workload:
    """Batch shapes and optimizer of a run, read from the YAML.

    SFT/RM/DPO: ``micro_batch`` rows (RM, DPO: prompts, each with ``responses_per_prompt`` sequences) of
    ``seq_len`` tokens; DPO's reference runs a no-grad forward of the same micro-batch unless
    ``reference_precomputed``. PPO: a rollout of ``rollout_batch`` prompts of ``prompt_len`` tokens and
    ``new_tokens`` sampled tokens, scored in chunks of ``forward_batch`` rows, trained in micro-batches of
    ``micro_batch`` rows.
    Critic-free RL (GRPO, RLOO, REINFORCE++): ``group_size`` responses per prompt, sampled together, and
    ``value_function=False`` (no critic, no value head).
    FSDP2 (``shards`` > 1): see :func:`role_plan`.
    """

    stage: Stage
    micro_batch: int
    seq_len: int = 0
    responses_per_prompt: int = 2
    rollout_batch: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    forward_batch: int = 0
    optimizer_states: int = 2
    master_weights: bool = False
    target: Target = "cuda"
    shared_base: bool = False
    group_size: int = 1
    value_function: bool = True
    reference_precomputed: bool = False
    #: processes the weights are sharded over (FSDP2: devices × nodes); 1 = every process holds everything
    shards: int = 1
    #: under sharding, whether the frozen roles are sharded too (``frozen_roles: shard``) or whole on every process
    shard_frozen: bool = True
    #: a colocated inference engine (vLLM) holding its own copy of the policy: its weights, bytes (0 = HF generate)
    engine_weights: int = 0
    #: that engine's KV-cache budget, bytes (``kv_cache_memory_bytes``)
    engine_cache: int = 0


@dataclass
class RolePlan:
    """Memory of one role, bytes. ``activations`` is what the run uses (checkpointing as configured)."""

    name: str
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int = 0
    activations_no_checkpointing: int = 0
    activations_checkpointing: int = 0
    logits: int = 0
    #: FSDP2: the full weights (and, trained, gradients) of the units gathered at one time, besides the shards
    gathered: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def resident(self) -> int:
        """Held for the whole run: weights, adapters and optimizer states."""
        return self.weights + self.adapters + self.optimizer


@dataclass
class MemoryPlan:
    """The memory of a run: per role, per phase, and the peak."""

    stage: Stage
    roles: list[RolePlan]
    phases: dict[str, int]
    kv_cache: int = 0
    overhead: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        """Peak bytes, the device overhead included."""
        return self.phases[self.peak_phase] + self.overhead

    def fits(self, device_memory: int) -> bool:
        return self.peak <= device_memory


def _trainable_bytes(role: RoleSetup, weights: int, adapters: int) -> int:
    if not role.trainable:
        return 0
    return adapters if role.lora is not None else weights + adapters


def _adapter_bytes(role: RoleSetup) -> int:
    """LoRA adapters (float32: peft upcasts them), value head and a classifier's trainable head copy."""
    total = 0
    if role.lora is not None:
        total += lora_parameters(role.arch, role.lora) * 4
        if role.kind == "sequence_classifier":
            total += role.arch.hidden_size * 4  # peft trains a copy of the score head (modules_to_save)
    if role.value_head:
        total += (role.arch.hidden_size + 1) * 4
    return total


def _logits_bytes(role: RoleSetup, rows: int, positions: int) -> int:
    """Logits ``[B, positions, V]`` (causal LMs only; classifiers' ``[B, T, 1]`` scores are negligible)."""
    if role.kind != "causal_lm":
        return 0
    return rows * positions * role.arch.vocab_size * max(role.activation_bytes, 4 if role.dtype_bytes == 4 else 2)


def role_plan(role: RoleSetup, workload: Workload, rows: int, tokens: int, logit_positions: int) -> RolePlan:
    """Memory of one role; ``rows × tokens`` is its training micro-batch (ignored when it is frozen)."""
    weights = (
        0
        if role.shares_base_with
        else weight_bytes(role.arch, role.kind, role.dtype_bytes, role.quantization, trainable=role.trainable)
    )
    adapters = _adapter_bytes(role)
    trainable = _trainable_bytes(role, weights, adapters)
    # AdamW states have the parameter's dtype; fp32 master weights (DeepSpeed with 16-bit parameters) add their
    # own copy and keep the states in fp32
    optimizer = workload.optimizer_states * trainable
    notes = []
    if workload.master_weights and role.trainable and role.lora is None and role.dtype_bytes < 4:
        params = trainable // role.dtype_bytes
        optimizer = params * 4 * (1 + workload.optimizer_states)
        notes.append("fp32 master weights")
    plan = RolePlan(role.name, weights, adapters, gradients=trainable, optimizer=optimizer, notes=notes)
    if workload.shards > 1 and not role.shares_base_with and (role.trainable or workload.shard_frozen):
        shard_role(plan, role, workload.shards)
    if role.shares_base_with:
        plan.notes.append(f"runs on {role.shares_base_with}'s base")
    if role.trainable:
        args = (role.arch, rows, tokens, role.activation_bytes)
        plan.activations_no_checkpointing = activation_bytes(*args, False, role.eager_attention)
        plan.activations_checkpointing = activation_bytes(*args, True, role.eager_attention)
        plan.activations = (
            plan.activations_checkpointing if role.gradient_checkpointing else plan.activations_no_checkpointing
        )
        # the logits and their gradient
        plan.logits = 2 * _logits_bytes(role, rows, logit_positions)
    return plan


def shard_role(plan: RolePlan, role: RoleSetup, shards: int) -> None:
    """FSDP2 over ``shards`` processes (lit_rlhf.hf.sharding): each holds ``1/shards`` of the role's weights,
    adapters, gradients and optimizer states, and while a unit runs its full weights: the root (embeddings, output
    head, norms: gathered for the whole forward) and two decoder layers (the running one and the next, prefetched);
    a trained role also holds one layer's full gradient before its reduce-scatter. Activations do not shrink:
    each process runs its own micro-batch.

    A 4/8-bit role's bitsandbytes weights (:func:`quantized_linear_bytes`) are left out of FSDP2 and held whole
    by every process; the rest of its weights (embeddings, head, norms) and its adapters are sharded, and the
    gathered units are its root and norms (the decoder layers gather no quantized weight)."""
    if role.quantization is not None:
        whole = quantized_linear_bytes(role.arch, role.quantization)
        rest = plan.weights - whole
        plan.weights = whole + math.ceil(rest / shards)
        plan.adapters = math.ceil(plan.adapters / shards)
        plan.gradients, plan.optimizer = math.ceil(plan.gradients / shards), math.ceil(plan.optimizer / shards)
        plan.gathered = rest
        plan.notes += [f"FSDP2 1/{shards}", f"{role.quantization.bits}-bit weights whole: {whole / GiB:.2f} GiB"]
        return
    total = plan.weights
    groups = role.arch.parameter_groups(role.kind)
    per_weight = total / max(1, groups["linear"] + groups["other"])
    layer = groups["linear"] / role.arch.num_layers * per_weight
    root = groups["other"] * per_weight
    plan.weights, plan.adapters = math.ceil(plan.weights / shards), math.ceil(plan.adapters / shards)
    plan.gradients, plan.optimizer = math.ceil(plan.gradients / shards), math.ceil(plan.optimizer / shards)
    gradient_layer = layer if role.trainable and role.lora is None else 0
    plan.gathered = int(root + 2 * layer + gradient_layer)
    plan.notes.append(f"FSDP2 1/{shards}")


def plan_memory(roles: list[RoleSetup], workload: Workload) -> MemoryPlan:
    """The memory plan of a run: per-role memory and the total of each phase.

    Phases (all roles stay loaded throughout):

    * ``training``: weights + optimizer states + gradients + the activations and logits of one micro-batch of
      every trained forward (gradients of earlier micro-batches are still held while the next one runs);
    * DPO ``reference``: + the reference's no-grad forward of one micro-batch (unless precomputed);
    * PPO ``generation``: + the KV cache of the rollout batch and the prefill of its prompts;
    * PPO ``scoring``: + the widest no-grad forward of the four scoring passes over a ``forward_batch`` chunk
      (with its logits, and the hidden states that value heads, critics and reward models ask for);
    * with a colocated engine (``engine_weights``, ``engine_cache``): its weights and KV cache in every phase, and
      ``generation`` is the engine's (no HF KV cache).
    """
    w = workload
    if w.stage == "ppo":
        tokens = w.prompt_len + w.new_tokens
        plans = [role_plan(r, w, w.micro_batch, tokens, w.new_tokens + 1) for r in roles]
    elif w.stage == "rm":
        plans = [role_plan(r, w, w.micro_batch * w.responses_per_prompt, w.seq_len, 0) for r in roles]
    elif w.stage == "dpo":
        plans = [role_plan(r, w, w.micro_batch * w.responses_per_prompt, w.seq_len, w.seq_len) for r in roles]
    else:
        plans = [role_plan(r, w, w.micro_batch, w.seq_len, w.seq_len) for r in roles]
    resident = sum(p.resident for p in plans)
    grads = sum(p.gradients for p in plans)
    training = resident + grads + sum(p.activations + p.logits for p in plans)
    if w.target == "cuda":
        # foreach AdamW builds one temporary per state tensor (sqrt of the second moment) during the step
        training = max(training, resident + grads + max((p.gradients for p in plans), default=0))
    phases = {"training": training}
    kv = 0
    notes: list[str] = []
    reference = next((r for r in roles if r.name == "reference"), None)
    if w.stage == "dpo" and reference is not None and not w.reference_precomputed:
        # the reference's no-grad forward of the micro-batch (before the policy's, so not on top of its activations)
        rows = w.micro_batch * w.responses_per_prompt
        work = no_grad_forward_bytes(reference.arch, rows, w.seq_len, reference.activation_bytes, False)
        phases["reference"] = resident + work + _logits_bytes(reference, rows, w.seq_len)
    if w.stage == "ppo":
        policy = next(r for r in roles if r.name == "policy")
        rows = w.rollout_batch * w.group_size  # sampled by one generate call
        kv = kv_cache_bytes(policy.arch, rows, w.prompt_len + w.new_tokens, policy.activation_bytes)
        prefill = no_grad_forward_bytes(policy.arch, rows, w.prompt_len, policy.activation_bytes, False)
        # sampling draws from float32 scores of the last position only
        phases["generation"] = resident + kv + prefill + rows * policy.arch.vocab_size * 4 * 2
        scoring = []
        for role in roles:
            with_hidden = role.kind == "sequence_classifier" or role.value_head
            work = no_grad_forward_bytes(role.arch, w.forward_batch, tokens, role.activation_bytes, with_hidden)
            work += _logits_bytes(role, w.forward_batch, w.new_tokens + 1)
            scoring.append(work)
        phases["scoring"] = resident + max(scoring)
        if w.shared_base:
            adapters = "/".join(r.name.replace("reward_model", "reward") for r in roles if r.name != "reference")
            notes.append(f"shared base: one base model, adapters {adapters}, reference = adapters off")
    engine = w.engine_weights + w.engine_cache
    if w.stage == "ppo" and engine:
        # the engine's copy and its cache stay allocated in every phase; it samples instead of HF generate
        phases = {name: total + engine for name, total in phases.items()}
        phases["generation"] = resident + engine
        notes.append(
            f"rollout engine: {w.engine_weights / GiB:.2f} GiB of policy weights + {w.engine_cache / GiB:.2f} GiB "
            "KV cache, held throughout"
        )
    gathered = max((p.gathered for p in plans), default=0)
    if gathered:  # one role's units are gathered at a time, in every phase
        phases = {name: total + gathered for name, total in phases.items()}
        notes.append(f"FSDP2 over {w.shards} processes: + {gathered / GiB:.2f} GiB of gathered layers (largest role)")
    overhead = CUDA_OVERHEAD if w.target == "cuda" else CPU_OVERHEAD
    return MemoryPlan(w.stage, plans, phases, kv_cache=kv, overhead=overhead, notes=notes)


# ---- the PPO role layouts ----------------------------------------------------------------------------------------
def ppo_roles(
    policy: RoleSetup,
    reference: RoleSetup | None,
    critic: RoleSetup | None,
    reward_model: RoleSetup | None,
    shared_base: bool = False,
    value_function: bool = True,
) -> list[RoleSetup]:
    """The four PPO roles as :class:`~lit_rlhf.models.PPOModule` builds them.

    ``reference=None``: the policy's own weights (a LoRA policy with its adapter disabled) when the policy has
    LoRA, else a frozen copy. ``critic=None``: a value head on the policy. ``shared_base``: one base (the
    policy's, LoRA added when missing) carrying the adapters ``policy``, ``critic`` (+ value head) and
    ``reward`` (frozen, + score head); the reference is the base with every adapter off. ``value_function=False``
    (critic-free RL): no critic and no value head.
    """
    if shared_base:
        lora = policy.lora or LoraSpec()
        base = replace(policy, lora=lora, value_head=False)
        frozen = dict(trainable=False, gradient_checkpointing=False, shares_base_with="policy")
        roles = [base, replace(base, name="reference", lora=None, **frozen)]
        if value_function:  # the critic: its own forward pass through the base, its adapter and a scalar head
            roles.append(replace(base, name="critic", kind="sequence_classifier", shares_base_with="policy"))
        if reward_model is not None:
            roles.append(replace(base, name="reward_model", kind="sequence_classifier", **frozen))
        return roles
    roles = [replace(policy, value_head=critic is None and value_function)]
    if reference is not None:
        roles.append(reference)
    elif policy.lora is not None:
        frozen = dict(trainable=False, lora=None, gradient_checkpointing=False, value_head=False)
        roles.append(replace(policy, name="reference", shares_base_with="policy", **frozen))
    else:
        roles.append(replace(policy, name="reference", trainable=False, gradient_checkpointing=False))
    if critic is not None:
        roles.append(critic)
    if reward_model is not None:
        roles.append(reward_model)
    return roles


# ---- a whole run and what to change when it does not fit -------------------------------------------------------
QLORA = QuantizationSpec(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")


@dataclass(frozen=True)
class Run:
    """A run to plan: its workload and the roles as configured.

    ``specs`` holds ``model`` (SFT, RM), or ``policy`` and the reference as DPO runs it (a copy, or the
    policy's base with its adapter disabled), or ``policy`` and, when it is a model of its own, ``reference``,
    ``critic`` and ``reward_model`` (PPO: :func:`ppo_roles` lays them out).
    """

    workload: Workload
    specs: dict[str, RoleSetup]

    def roles(self) -> list[RoleSetup]:
        if self.workload.stage == "dpo":
            return [self.specs["policy"], *([self.specs["reference"]] if "reference" in self.specs else [])]
        if self.workload.stage != "ppo":
            return [self.specs["model"]]
        get = self.specs.get
        w = self.workload
        return ppo_roles(
            get("policy"), get("reference"), get("critic"), get("reward_model"), w.shared_base, w.value_function
        )

    def plan(self) -> MemoryPlan:
        return plan_memory(self.roles(), self.workload)

    def with_micro_batch(self, micro_batch: int) -> Run:
        w = self.workload
        return replace(
            self, workload=replace(w, micro_batch=micro_batch, forward_batch=min(w.forward_batch, micro_batch))
        )

    def with_rollout_batch(self, prompts: int) -> Run:
        """PPO: fewer prompts per iteration (``data.batch_size``): a smaller KV cache while sampling."""
        w = self.workload
        return replace(
            self,
            workload=replace(
                w,
                rollout_batch=prompts,
                forward_batch=min(w.forward_batch, prompts),
                micro_batch=min(w.micro_batch, prompts),
            ),
        )

    def with_checkpointing(self) -> Run:
        specs = {k: replace(r, gradient_checkpointing=True) if r.trainable else r for k, r in self.specs.items()}
        return replace(self, specs=specs)

    def with_qlora(self) -> Run:
        """LoRA on a 4-bit base for the trained roles, 4-bit frozen roles (16-bit compute)."""

        def quantize(role: RoleSetup) -> RoleSetup:
            lora = (role.lora or LoraSpec()) if role.trainable else role.lora
            return replace(role, lora=lora, quantization=QLORA, activation_bytes=2)

        return replace(self, specs={k: quantize(r) for k, r in self.specs.items()})

    def with_lora_value_head(self) -> Run:
        """PPO: LoRA policy (reference = its adapter disabled) with a value head instead of a critic network."""
        policy = self.specs["policy"]
        specs = {k: r for k, r in self.specs.items() if k not in ("critic", "reference")}
        specs["policy"] = replace(policy, lora=policy.lora or LoraSpec())
        return replace(self, specs=specs)

    def with_shared_base(self, quantization: QuantizationSpec | None = QLORA) -> Run:
        """PPO: one (4-bit) base for every role."""
        policy = self.specs["policy"]
        policy = replace(policy, lora=policy.lora or LoraSpec())
        if quantization is not None:
            policy = replace(policy, quantization=quantization, activation_bytes=2)
        return replace(self, specs={**self.specs, "policy": policy}, workload=replace(self.workload, shared_base=True))


def suggestions(run: Run, device_memory: int) -> list[tuple[str, MemoryPlan]]:
    """Changes that lower the peak, each with its plan, those that fit first (in this order: micro-batch,
    PPO rollout batch when sampling is the peak, gradient checkpointing, 4-bit + LoRA, LoRA + value head, shared
    4-bit base, then all of them together)."""
    w = run.workload
    found: list[tuple[str, Run]] = []
    if w.micro_batch > 1:
        micro = w.micro_batch
        while micro > 1 and not run.with_micro_batch(micro).plan().fits(device_memory):
            micro //= 2
        micro = max(micro, 1)
        found.append((f"micro-batch {w.micro_batch} -> {micro} rows", run.with_micro_batch(micro)))
    if w.stage == "ppo" and run.plan().peak_phase == "generation" and w.rollout_batch > 1:
        prompts = w.rollout_batch
        while prompts > 1 and not run.with_rollout_batch(prompts).plan().fits(device_memory):
            prompts //= 2
        found.append(
            (f"rollout batch (data batch_size) {w.rollout_batch} -> {prompts} prompts", run.with_rollout_batch(prompts))
        )
    if any(r.trainable and not r.gradient_checkpointing for r in run.specs.values()):
        found.append(("gradient_checkpointing: true on the trained models", run.with_checkpointing()))
    if any(r.quantization is None for r in run.specs.values()):
        found.append(("LoRA + 4-bit base (QLoRA; LoRAQuantization callback, bf16-mixed)", run.with_qlora()))
    if w.stage == "ppo":
        if w.value_function and ("critic" in run.specs or run.specs["policy"].lora is None):
            found.append(("LoRA policy + value head (value_head: true, no critic network)", run.with_lora_value_head()))
        if not w.shared_base:
            roles = (
                "policy, reference, critic and reward model"
                if w.value_function
                else "policy, reference and reward model"
            )
            found.append((f"shared 4-bit base for {roles}", run.with_shared_base()))
    everything = run.with_checkpointing().with_micro_batch(1)
    everything = everything.with_shared_base() if w.stage == "ppo" else everything.with_qlora()
    found.append(("all of these together (micro-batch 1)", everything))
    plans = [(text, candidate.plan()) for text, candidate in found]
    return sorted(plans, key=lambda item: not item[1].fits(device_memory))
