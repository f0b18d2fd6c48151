"""RL algorithms as pure-tensor objects (docs/conventions.md#rl-algorithms): each is one dataclass in one file,
chosen in YAML by ``class_path`` (``algorithm: {class_path: lit_rlhf.rlhf.algorithms.GSPO}``).

* :class:`PPO`: a critic and GAE.
* group baselines: :class:`GRPO`, :class:`DrGRPO`, :class:`RLOO`, :class:`GSPO` (and :class:`GSPOToken`),
  :class:`CISPO`, :class:`DAPO`.
* :class:`REINFORCEPP`, :class:`REINFORCEPPBaseline`: whitened returns, no critic.
"""

from lit_rlhf.rlhf.algorithms.base import Algorithm, GroupAlgorithm, KLPlacement
from lit_rlhf.rlhf.algorithms.cispo import CISPO, cispo_policy_loss
from lit_rlhf.rlhf.algorithms.dapo import DAPO, overlong_penalty, signal_groups
from lit_rlhf.rlhf.algorithms.grpo import GRPO, DrGRPO
from lit_rlhf.rlhf.algorithms.gspo import GSPO, GSPOToken, sequence_logratio
from lit_rlhf.rlhf.algorithms.ppo import PPO
from lit_rlhf.rlhf.algorithms.reinforce_pp import REINFORCEPP, REINFORCEPPBaseline
from lit_rlhf.rlhf.algorithms.rloo import RLOO

__all__ = [
    "Algorithm",
    "CISPO",
    "DAPO",
    "DrGRPO",
    "GRPO",
    "GSPO",
    "GSPOToken",
    "GroupAlgorithm",
    "KLPlacement",
    "PPO",
    "REINFORCEPP",
    "REINFORCEPPBaseline",
    "RLOO",
    "cispo_policy_loss",
    "overlong_penalty",
    "sequence_logratio",
    "signal_groups",
]
