"""Memory planning: how much memory a stage's YAML needs, before any weight is loaded.

:mod:`lit_rlhf.planning.memory` holds the arithmetic (pure functions of a model's shape and the run's settings);
:mod:`lit_rlhf.plan` reads a stage's YAML the way ``python -m lit_rlhf fit`` does and prints the plan.
"""

from lit_rlhf.planning.memory import (
    Architecture,
    MemoryPlan,
    RolePlan,
    RoleSetup,
    Workload,
    kv_cache_bytes,
    lora_parameters,
    plan_memory,
    quantized_4bit_bytes,
    quantized_linear_bytes,
    weight_bytes,
)

__all__ = [
    "Architecture",
    "MemoryPlan",
    "RolePlan",
    "RoleSetup",
    "Workload",
    "kv_cache_bytes",
    "lora_parameters",
    "plan_memory",
    "quantized_4bit_bytes",
    "quantized_linear_bytes",
    "weight_bytes",
]
