"""Window sampling from the replay buffer: ours (cached valid starts) vs torchrl's SliceSampler.

Why lit_meta.rl.RolloutBuffer samples windows itself while storing in torchrl's LazyTensorStorage:
SliceSampler finds the trajectory runs in the storage again on every call, and it draws a trajectory
first, then a start in it (windows of short segments are over-sampled); ours keeps the valid window
starts as the buffer grows and draws uniformly among them. Both draw ``meta_batch``
windows of ``past_window + future_window`` = 32 transitions (HalfCheetah-sized: obs 18, action 6) from
buffers of rollouts of 1000 steps; ms per meta-batch, median of ``--repeats`` after one warm-up.

    python benchmarks/window_sampling.py            # 10k, 100k, 1M transitions, 1 thread
    python benchmarks/window_sampling.py --quick
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, median_ms  # noqa: E402

from lit_meta.rl import Rollout, RolloutBuffer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a gather this small only waits on a second thread)")
    parser.add_argument("--quick", action="store_true", help="10k transitions, 3 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats = [10_000], 3
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, ReplayBuffer, SliceSampler

    print(machine_line())
    print(f"{args.meta_batch} windows of {args.window} transitions per meta-batch, rollouts of 1000 steps")
    print(f"{'transitions':>12} | {'ours ms':>8} | {'torchrl SliceSampler ms':>24} | {'ratio':>6}")
    for size in args.sizes:
        generator = torch.Generator().manual_seed(0)
        rollouts = [Rollout(torch.randn(1000, 18), torch.randn(1000, 6), torch.randn(1000, 18), torch.randn(1000),
                            torch.zeros(1000, dtype=torch.bool), torch.zeros(1000, 1), i) for i in range(size // 1000)]
        ours = RolloutBuffer(capacity=size, window=args.window)
        ours.add(rollouts)
        theirs = ReplayBuffer(storage=LazyTensorStorage(size),
                              sampler=SliceSampler(slice_len=args.window, traj_key="segment", strict_length=True),
                              batch_size=args.meta_batch * args.window)
        theirs.extend(TensorDict({k: ours.data(k) for k in ("obs", "action", "next_obs", "segment")}, [size]))
        theirs.set_rng(generator)
        t_ours = median_ms(lambda: ours.sample_windows(args.meta_batch, generator, args.window // 2), args.repeats)
        t_theirs = median_ms(lambda: theirs.sample(), args.repeats)
        print(f"{size:>12,} | {t_ours:>8.2f} | {t_theirs:>24.2f} | {t_theirs / t_ours:>5.0f}x")


if __name__ == "__main__":
    main()
