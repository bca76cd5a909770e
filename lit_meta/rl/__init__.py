"""Model-based meta-RL (GrBAL/ReBAL, Nagabandi et al. 2019): replay buffer of rollouts, vectorised collection,
MPC planners, dynamics learners, online adaptation and evaluation."""

from .buffer import Rollout, RolloutBuffer
from .collect import RandomPolicy, RolloutCollector, rollout_seeds
from .control import MPCController, env_reward_fns, evaluate, prediction_errors
from .dynamics import Normalizer
from .learners import MBMPC, DynamicsLearner, GrBAL, ImplicitGrBAL, ReBAL, RecurrentDynamics
from .ensemble import PETS, GaussianEnsemble
from .true_dynamics import TrueDynamics
from .planners import PlanResult, action_bounds, cem, mppi, random_shooting, shift_plan

__all__ = ["Rollout", "RolloutBuffer", "RandomPolicy", "RolloutCollector", "rollout_seeds", "MPCController",
           "env_reward_fns", "evaluate", "prediction_errors", "Normalizer", "DynamicsLearner", "GrBAL",
           "ImplicitGrBAL", "ReBAL", "RecurrentDynamics", "MBMPC", "PlanResult", "random_shooting", "cem", "mppi",
           "shift_plan", "action_bounds", "TrueDynamics", "PETS", "GaussianEnsemble"]
