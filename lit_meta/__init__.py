"""lit-meta: meta-learning (iMAML, MAML, GrBAL/ReBAL) as PyTorch Lightning modules.

Public API: the LightningModules, the networks and the batch types. DataModules live in
``lit_meta.datamodules``, callbacks in ``lit_meta.callbacks``, environments in ``lit_meta.envs``, the
meta-RL pieces (buffer, planners, controller) in ``lit_meta.rl``; its learners are also reachable here
(``lit_meta.GrBAL``), imported on first use so that few-shot users do not load the RL stack.
"""

from .episode import Episode, Transitions, Window
from .learners import IMAML, MAML, EpisodicLearner, FineTune, MetaLearner, Reptile
from .nets import MLP, Conv4, check_functional

_RL = ("GrBAL", "ImplicitGrBAL", "ReBAL", "MBMPC")

__all__ = ["Episode", "Window", "Transitions", "EpisodicLearner", "MetaLearner", "FineTune", "IMAML", "MAML", "Reptile",
           "Conv4", "MLP", "check_functional", *_RL]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _RL:
        from . import rl

        return getattr(rl, name)
    raise AttributeError(f"module 'lit_meta' has no attribute {name!r}")
