"""lit-meta: meta-learning (iMAML, MAML, GrBAL/ReBAL) as PyTorch Lightning modules.

Public API: the LightningModules, the networks and the batch type. DataModules live in
``lit_meta.datamodules``, callbacks in ``lit_meta.callbacks``.
"""

from .episode import Episode
from .learners import IMAML, MAML, EpisodicLearner, FineTune, MetaLearner, Reptile
from .nets import MLP, Conv4, check_functional

__all__ = ["Episode", "EpisodicLearner", "MetaLearner", "FineTune", "IMAML", "MAML", "Reptile", "Conv4", "MLP", "check_functional"]
__version__ = "0.1.0"
