"""Env steps/s of every lit_meta env: one env, and gymnasium.vector (sync and async, 2 and 4 envs).

Claim (issue 5): collection does not stall training on CPU; HalfCheetah runs tens of thousands of raw
MuJoCo steps/s. Reported: env steps/s (one ``step()`` = ``frame_skip`` = 5 MuJoCo steps, random
actions, reset when an episode ends) and, for reference, raw ``mujoco.mj_step``/s of the official
HalfCheetah model. Vectorised rows count env steps (num_envs per ``step()``). Async uses one process
per env, so it only pays off with spare cores.

    python benchmarks/env_steps.py            # ~1-2 min
    python benchmarks/env_steps.py --quick    # ~20 s
    python benchmarks/env_steps.py --full     # 5 s per measurement

Writes docs/env_steps.png (bar chart) and prints the table with the machine line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np

import lit_meta.envs  # noqa: F401  (registers the ids)
from lit_meta.envs import ENV_IDS

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VECTOR = [("sync", 2), ("sync", 4), ("async", 2), ("async", 4)]


def _make(env_id):
    def thunk():
        import lit_meta.envs  # noqa: F401  (registration inside worker processes)
        return gym.make(env_id)
    return thunk


def single_steps_per_s(env_id: str, seconds: float) -> float:
    env = gym.make(env_id)
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (1024, *env.action_space.shape)).astype(np.float32)
    for a in actions[:50]:  # warm-up
        env.step(a)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a in actions[:256]:
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()
        steps += 256
    env.close()
    return steps / (time.perf_counter() - start)


def vector_steps_per_s(env_id: str, mode: str, n: int, seconds: float) -> float:
    cls = gym.vector.SyncVectorEnv if mode == "sync" else gym.vector.AsyncVectorEnv
    vec = cls([_make(env_id) for _ in range(n)])
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (256, n, *vec.single_action_space.shape)).astype(np.float32)
    for a in actions[:20]:
        vec.step(a)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a in actions[:64]:
            vec.step(a)  # autoreset inside
        steps += 64 * n
    rate = steps / (time.perf_counter() - start)
    vec.close()
    return rate


def raw_mj_steps_per_s(seconds: float) -> float:
    # the official half_cheetah.xml as lit_meta compiles it (bitwise the same dynamics as HalfCheetah-v5,
    # tested; without MuJoCo's deprecation warning for settotalmass)
    model = gym.make("lit_meta/HalfCheetahMass-v0").unwrapped.model
    data = mujoco.MjData(model)
    data.ctrl[:] = 0.5
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mujoco.mj_step(model, data, nstep=1000)
        steps += 1000
        if not np.isfinite(data.qpos).all():
            mujoco.mj_resetData(model, data)
    return steps / (time.perf_counter() - start)


def plot(rows, raw: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0].split("/")[1].removesuffix("-v0") for r in rows]
    columns = ["single"] + [f"{m} x{n}" for m, n in VECTOR]
    x = np.arange(len(rows))
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for j, col in enumerate(columns):
        ax.bar(x + (j - (len(columns) - 1) / 2) * width, [r[1 + j] for r in rows], width, label=col)
    ax.axhline(raw / 5, color="k", ls="--", lw=1, label=f"raw mj_step/s / 5 (HalfCheetah): {raw / 5:,.0f}")
    ax.set_ylim(0, 1.3 * max(raw / 5, max(max(r[1:]) for r in rows)))  # room for the legend
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("env steps / s")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short timings (~20 s in all)")
    size.add_argument("--full", action="store_true", help="long timings (5 s per measurement)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing per measurement (default 1.5, quick 0.25, full 5)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "env_steps.png"))
    args = parser.parse_args()
    seconds = args.seconds or (0.25 if args.quick else 5.0 if args.full else 1.5)
    line = machine_line()
    print(line)
    print(f"mujoco {mujoco.__version__} | gymnasium {gym.__version__} | {seconds:g} s per measurement | "
          f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '-')}")
    raw = raw_mj_steps_per_s(seconds)
    print(f"raw mujoco.mj_step/s, HalfCheetah (one physics step of 0.01 s): {raw:,.0f}  (= {raw / 5:,.0f} "
          f"env steps/s at frame_skip 5)\n")
    header = f"{'env steps/s':<34}{'single':>10}" + "".join(f"{m + ' x' + str(n):>11}" for m, n in VECTOR)
    print(header)
    print("-" * len(header))
    rows = []
    for env_id in ENV_IDS:
        row = [env_id, single_steps_per_s(env_id, seconds)]
        row += [vector_steps_per_s(env_id, mode, n, seconds) for mode, n in VECTOR]
        rows.append(row)
        print(f"{env_id:<34}{row[1]:>10,.0f}" + "".join(f"{v:>11,.0f}" for v in row[2:]), flush=True)
    plot(rows, raw, Path(args.plot), f"lit_meta env steps/s  ({line})")
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
