"""EnvPool in async mode, stepped with an AGaLiTe (or GaLiTe) core through ``env_ids``.

With ``batch_size < num_envs`` EnvPool's ``recv()`` returns whichever ``batch_size`` environments have
finished their step, identified by ``info["env_id"]``, while the others keep running. The core keeps
one state for all ``num_envs`` environments and steps exactly the rows that came back, in place:

    feats, _ = model(x, state, episode_start, env_ids=ids, out=state)

``episode_start`` is ``info["elapsed_step"] == 0``: EnvPool resets a finished environment on its next
step and returns the new episode's first observation, which is what the core's ``dones`` mean.

The default task is MiniGrid's ``Memory`` (``MiniGrid-MemoryS7-v0``): the agent sees an object in a
start room and must pick the matching one at the end of a corridor. ``--env CartPole-v1`` works too.
The policy here is an untrained linear head that samples actions; training on top is the usual
per-env trajectory bookkeeping. Prints env-steps/s and episode statistics.

    pip install -e ".[envpool]"
    python examples/envpool_async.py --num-envs 16 --batch-size 8 --steps 2000
    python examples/envpool_async.py --core galite --nu 2      # GaLiTe, the exact model AGaLiTe approximates
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from agalite_triton import AGaLiTe, GaLiTe
from agalite_triton.stack import RecurrentStack

MODELS: dict[str, type[RecurrentStack]] = {"agalite": AGaLiTe, "galite": GaLiTe}


def encode(obs: np.ndarray | dict[str, np.ndarray]) -> torch.Tensor:
    """Float32 features: MiniGrid's 7x7x3 view (scaled) and a one-hot direction, or a flat Box as it is."""
    if isinstance(obs, dict):
        image = torch.from_numpy(obs["image"].reshape(len(obs["image"]), -1).astype(np.float32) / 10.0)
        direction = nn.functional.one_hot(torch.from_numpy(obs["direction"].astype(np.int64)), 4).float()
        return torch.cat([image, direction], dim=1)
    return torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(len(obs), -1))


def input_dim(env) -> int:
    space = env.observation_space
    if hasattr(space, "spaces") and "image" in space.spaces:
        return int(np.prod(space["image"].shape)) + 4
    return int(np.prod(space.shape))


@dataclass
class Record:
    """What one ``recv`` / step carried: the ids, their inputs, episode starts and the core's features."""

    ids: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    starts: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)


def run(env, model: RecurrentStack, head: nn.Module, steps: int, seed: int = 0, record: Record | None = None) -> dict:
    """``steps`` async batches: recv, step the core on those env_ids in place, sample, send."""
    num_envs = env.config["num_envs"]
    state = model.initial_state(num_envs)
    returns = np.zeros(num_envs)
    finished: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    env.async_reset()
    frames = 0
    start_time = time.perf_counter()
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.recv()
        env_id = info["env_id"]
        ids = torch.from_numpy(env_id.astype(np.int64))
        starts = torch.from_numpy(info["elapsed_step"] == 0)
        x = encode(obs)
        with torch.no_grad():
            feats, _ = model(x, state, starts, env_ids=ids, out=state)
            actions = _sample(head(feats), gen)
        env.send(actions.numpy(), env_id)
        returns[env_id] += reward
        ended = terminated | truncated
        finished.extend(returns[env_id[ended]].tolist())
        returns[env_id[ended]] = 0.0
        frames += len(env_id)
        if record is not None:
            record.ids.append(ids)
            record.inputs.append(x)
            record.starts.append(starts)
            record.features.append(feats.clone())
    seconds = time.perf_counter() - start_time
    return dict(frames=frames, seconds=seconds, episodes=len(finished),
                mean_return=float(np.mean(finished)) if finished else float("nan"), state=state)  # fmt: skip


def _sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # A generator of its own, so that a replay of the same run draws the same actions.
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)


def make(env_name: str, num_envs: int, batch_size: int, seed: int):
    import envpool

    if not 0 < batch_size <= num_envs:
        raise ValueError(f"batch_size: expected 0 < batch_size <= num_envs={num_envs}, got {batch_size}")
    return envpool.make(env_name, env_type="gymnasium", num_envs=num_envs, batch_size=batch_size, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="MiniGrid-MemoryS7-v0")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="environments per recv (async when < num-envs)")
    parser.add_argument("--steps", type=int, default=2000, help="recv/send rounds")
    parser.add_argument("--core", choices=sorted(MODELS), default="agalite")
    parser.add_argument("--preset", default=None, help="a preset of the core (default: 1 layer, d_model 64)")
    parser.add_argument("--nu", type=int, default=2, help="GaLiTe's feature multiplier (--core galite)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = make(args.env, args.num_envs, args.batch_size, args.seed)
    torch.manual_seed(args.seed)
    dim = input_dim(env)
    model_class = MODELS[args.core]
    if args.preset:
        model = model_class.from_preset(args.preset, input_dim=dim)
    else:
        own = dict(eta=4, r=4) if args.core == "agalite" else dict(nu=args.nu)
        model = model_class(input_dim=dim, d_model=64, n_layers=1, n_heads=4, d_head=16, d_ffc=64, **own)
    head = nn.Linear(model.d_model, int(env.action_space.n))
    stats = run(env, model, head, args.steps, seed=args.seed)
    print(
        f"{args.env} ({args.core}): {stats['frames']} env-steps in {stats['seconds']:.2f} s "
        f"({stats['frames'] / stats['seconds']:.0f} env-steps/s), {args.num_envs} envs, batch {args.batch_size}; "
        f"{stats['episodes']} episodes ended, mean return {stats['mean_return']:.3f}"
    )


if __name__ == "__main__":
    main()
