"""Recurrent PPO on a memory task: AGaLiTe vs GaLiTe (the exact model it approximates) vs LSTM vs a
memoryless MLP.

CleanRL-style single file: vectorised envs, GAE, clipped objective, and minibatches of whole
(env, segment) rows replayed from the recurrent state each env had at the segment's start
(:class:`agalite_triton.rl.SegmentStates`), with episode ends inside a segment masked during the
update exactly as during the rollout. The state is carried across rollouts, never rebuilt. The first
minibatch of every update, replayed before any optimiser step, must reproduce the rollout's
log-probabilities and values (``replay_tolerance``); a replay that has lost the rollout's state or
dones stops the run.

    python examples/ppo_memory.py --core agalite --corridor 20 --seed 1          # the cue-recall T-maze
    python examples/ppo_memory.py --env popgym:RepeatPreviousEasy --core agalite --r 4 --seed 1
    python examples/ppo_memory.py --core galite --nu 2 --corridor 20 --seed 1    # GaLiTe, the exact model

``--env popgym:<Name>`` takes any POPGym environment with a Discrete or MultiDiscrete action space
(``pip install -e ".[rl]"``, which pins popgym 1.0.7), vectorised with gymnasium's ``SyncVectorEnv``
(same-step autoreset). Observations are flattened with gymnasium's ``FlattenObservation``: a Discrete
becomes a one-hot, a MultiDiscrete one one-hot per component, a Tuple or Dict the concatenation of
its parts, a Box stays as it is; then float32. A MultiDiscrete action space becomes one Discrete over
all combinations (POPGym's ``DiscreteAction``). Environments that declare ``obs_requires_prev_action``
(MultiarmedBandit, Concentration, Battleship, MineSweeper) also get POPGym's ``PreviousAction`` and
``Antialias`` wrappers (the previous action and an is-first-step flag in the observation);
``--popgym-prev-action`` adds them to every environment, as POPGym's own baselines do.

writes ``metrics.csv``, ``metrics.json`` and ``curve.png`` under ``examples/runs/<run name>/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

from agalite_triton.envs import TMazeVecEnv
from agalite_triton.rl import SegmentStates

CORES = ("agalite", "galite", "lstm", "none")
POPGYM_PREFIX = "popgym:"


@dataclasses.dataclass
class PPOConfig:
    core: str = "agalite"
    # "tmaze" (the cue-recall T-maze below) or "popgym:<Name>", e.g. "popgym:RepeatPreviousEasy".
    env: str = "tmaze"
    popgym_prev_action: bool = False
    corridor: int = 20
    num_distractors: int = 0
    seed: int = 1
    total_timesteps: int = 100_000
    num_envs: int = 32
    num_steps: int = 128
    segment_len: int = 128
    learning_rate: float = 1e-3
    adam_eps: float = 1e-5  # CleanRL's; torch's default is 1e-8
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    n_layers: int = 1
    n_heads: int = 4
    d_head: int = 16
    d_ffc: int = 64
    eta: int = 4  # AGaLiTe's feature multiplier and approximation terms
    r: int = 2
    nu: int = 2  # GaLiTe's feature multiplier
    backend: str | None = None
    device: str = "cpu"
    threads: int = 1
    target_return: float = 0.9
    # Stop once this many consecutive rollouts reach target_return (0: always run total_timesteps).
    stop_after_target: int = 0
    # Largest |difference| allowed between the rollout's and the first replayed minibatch's
    # log-probabilities and values (float32 rounding; a replay from wrong states is far off).
    replay_tolerance: float = 1e-4
    # Options of the CountRecall study (examples/diagnose_count.py); the defaults are the original's model.
    # The episode-start flag (the step's done) as one more input feature of the core, for every core.
    start_flag: bool = False
    # The step number inside the episode, / 100, as one more observation feature (a diagnostic oracle).
    step_feature: bool = False
    # AGaLiTe's tick restarted at every episode start (the tick of a fresh state), inside sequences too.
    tick_restart: bool = False
    # The GRU gates' bias b_g (None: the original's 2.0, which starts every gate near the identity).
    gate_bias: float | None = None
    # The eps of the read-out's denominator (None: the original's, 2r<s, q> + 1e-5 for AGaLiTe and
    # <s, q> + 1e-10 for GaLiTe).
    attn_eps: float | None = None

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def options_tag(self) -> str:
        """The CountRecall study's options that differ from the defaults, for run names."""
        tag = "".join(f"_{name}" for name in ("start_flag", "step_feature", "tick_restart") if getattr(self, name))
        if self.n_layers != PPOConfig.n_layers:
            tag += f"_L{self.n_layers}"
        if self.gate_bias is not None:
            tag += f"_gb{self.gate_bias:g}"
        if self.attn_eps is not None:
            tag += f"_eps{self.attn_eps:g}"
        if self.learning_rate != PPOConfig.learning_rate:
            tag += f"_lr{self.learning_rate:g}"
        return tag

    @property
    def run_name(self) -> str:
        sizes = {"agalite": f"agalite_r{self.r}_eta{self.eta}", "galite": f"galite_nu{self.nu}"}
        core = sizes.get(self.core, self.core) + self.options_tag
        # Beside, not over, the runs with the default number of epochs.
        epochs = "" if self.update_epochs == PPOConfig.update_epochs else f"_ep{self.update_epochs}"
        if self.env == "tmaze":
            return f"{self.core}_L{self.corridor}{epochs}_s{self.seed}"
        return f"{self.env.replace(':', '-')}_{core}{epochs}_s{self.seed}"


def make_popgym_envs(name: str, num_envs: int, prev_action: bool = False) -> gym.vector.VectorEnv:
    """``num_envs`` copies of POPGym's ``name`` as a same-step-autoreset ``SyncVectorEnv`` with flat
    observations (see the module docstring for the encoding) and one Discrete action space."""
    try:
        import popgym.envs
        from popgym import wrappers
    except ImportError as err:
        raise ImportError(
            f"env: popgym:{name} needs popgym (pip install -e '.[rl]', which pins popgym==1.0.7)"
        ) from err
    classes = {cls.__name__: cls for cls in popgym.envs.ALL}
    if name not in classes:
        raise ValueError(f"env: expected popgym:<Name> with Name one of {sorted(classes)}, got popgym:{name!r}")
    cls = classes[name]
    action_space = cls().action_space
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        raise ValueError(f"env: popgym:{name} has action space {action_space}; expected Discrete or MultiDiscrete")

    def make() -> gym.Env:
        env = cls()
        if prev_action or cls.obs_requires_prev_action:
            env = wrappers.Antialias(wrappers.PreviousAction(env))
        if isinstance(action_space, gym.spaces.MultiDiscrete):
            # Outside PreviousAction, so that the previous action is seen as one one-hot per component.
            env = wrappers.DiscreteAction(env)
        return gym.wrappers.FlattenObservation(env)

    return gym.vector.SyncVectorEnv([make for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def make_envs(cfg: PPOConfig) -> gym.vector.VectorEnv:
    if cfg.env == "tmaze":
        return TMazeVecEnv(cfg.num_envs, corridor_len=cfg.corridor, num_distractors=cfg.num_distractors, seed=cfg.seed)
    if cfg.env.startswith(POPGYM_PREFIX):
        return make_popgym_envs(cfg.env[len(POPGYM_PREFIX) :], cfg.num_envs, cfg.popgym_prev_action)
    raise ValueError(f"env: expected 'tmaze' or 'popgym:<Name>', got {cfg.env!r}")


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class StackCore(nn.Module):
    """The AGaLiTe (``--core agalite``) or GaLiTe (``--core galite``) stack itself; its state is the
    model's (``AGaLiTeState`` or ``GaLiTeState``), which :class:`SegmentStates` stores as it is."""

    def __init__(self, obs_dim: int, cfg: PPOConfig) -> None:
        super().__init__()
        from agalite_triton import AGaLiTe, GaLiTe

        sizes = dict(d_model=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_head=cfg.d_head,
                     d_ffc=cfg.d_ffc, backend=cfg.backend, batch_first=True)  # fmt: skip
        if cfg.core == "agalite":
            self.net = AGaLiTe(obs_dim, eta=cfg.eta, r=cfg.r, **sizes)
        else:
            self.net = GaLiTe(obs_dim, nu=cfg.nu, **sizes)
        self.out_dim = cfg.hidden
        self.tick_restart = cfg.tick_restart
        with torch.no_grad():
            for layer in self.net.layers:
                if cfg.gate_bias is not None:
                    layer.gate1.bgp.fill_(cfg.gate_bias)
                    layer.gate2.bgp.fill_(cfg.gate_bias)
                if cfg.attn_eps is not None:
                    layer.attn.eps = cfg.attn_eps

    def initial_state(self, n: int, device: torch.device) -> Any:
        return self.net.initial_state(n, device=device)

    def forward(self, x: torch.Tensor, state: Any, dones: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if not self.tick_restart:
            return self.net(x, state, dones)
        # Every step that starts an episode restarts from a fresh state (zero memory, the initial tick):
        # the same zeroing as its done, and a tick that counts from the episode's start.
        starts = dones.bool()
        fresh = self.net.initial_state(int(starts.sum()), device=x.device)
        return self.net(x, state, dones, restart=starts, restart_state=fresh)


class LSTMCore(nn.Module):
    """Encoder + ``nn.LSTM``; CleanRL's done-masking (state times 1 - done before each step).

    The state is ``(h, c)`` stacked batch-first as one tensor (B, 2 * layers, hidden), so the same
    :class:`SegmentStates` stores it.
    """

    def __init__(self, obs_dim: int, cfg: PPOConfig) -> None:
        super().__init__()
        self.encoder = nn.Sequential(layer_init(nn.Linear(obs_dim, cfg.hidden)), nn.ReLU())
        self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, num_layers=cfg.n_layers, batch_first=True)
        for name, param in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0)
            elif "weight" in name:
                nn.init.orthogonal_(param, 1.0)
        self.layers = cfg.n_layers
        self.out_dim = cfg.hidden

    def initial_state(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n, 2 * self.layers, self.out_dim, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor, dones: torch.Tensor) -> tuple[torch.Tensor, Any]:
        single = x.dim() == 2
        if single:
            x, dones = x.unsqueeze(1), dones.unsqueeze(1)
        z = self.encoder(x)
        h = state[:, : self.layers].transpose(0, 1).contiguous()
        c = state[:, self.layers :].transpose(0, 1).contiguous()
        outs = []
        for t in range(z.shape[1]):
            keep = (1.0 - dones[:, t].float()).view(1, -1, 1)
            out, (h, c) = self.lstm(z[:, t : t + 1], (h * keep, c * keep))
            outs.append(out)
        y = torch.cat(outs, dim=1)
        return (y[:, 0] if single else y), torch.cat([h, c], dim=0).transpose(0, 1)


class MLPCore(nn.Module):
    """Memoryless control; carries an empty (B, 0) state so the training loop is the same."""

    def __init__(self, obs_dim: int, cfg: PPOConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            layer_init(nn.Linear(obs_dim, cfg.hidden)), nn.Tanh(),
            layer_init(nn.Linear(cfg.hidden, cfg.hidden)), nn.Tanh(),
        )
        self.out_dim = cfg.hidden

    def initial_state(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n, 0, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor, dones: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.net(x), state


class Agent(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, cfg: PPOConfig) -> None:
        super().__init__()
        core_cls = {"agalite": StackCore, "galite": StackCore, "lstm": LSTMCore, "none": MLPCore}[cfg.core]
        self.start_flag = cfg.start_flag
        self.core = core_cls(obs_dim + int(cfg.start_flag), cfg)
        self.actor = layer_init(nn.Linear(self.core.out_dim, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(self.core.out_dim, 1), std=1.0)

    def initial_state(self, n: int, device: torch.device) -> Any:
        return self.core.initial_state(n, device)

    def forward(self, x: torch.Tensor, state: Any, dones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x (B, obs) with dones (B,), or x (B, T, obs) with dones (B, T): logits, values, new state."""
        if self.start_flag:
            x = torch.cat([x, dones.unsqueeze(-1).to(x.dtype)], dim=-1)
        y, state = self.core(x, state, dones)
        return self.actor(y), self.critic(y).squeeze(-1), state


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor,
    next_done: torch.Tensor, gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CleanRL's GAE on (T, N) tensors; dones[t] = observation t starts an episode."""
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        if t == steps - 1:
            nonterminal, next_values = 1.0 - next_done, next_value
        else:
            nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * next_values * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        advantages[t] = last
    return advantages, advantages + values


def train(cfg: PPOConfig, run_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train and return the config, the curve (one point per iteration) and the timing."""
    if cfg.core not in CORES:
        raise ValueError(f"core: expected one of {CORES}, got {cfg.core!r}")
    if cfg.tick_restart and cfg.core != "agalite":
        raise ValueError(f"tick_restart: an option of the agalite core (GaLiTe has no tick), got core={cfg.core!r}")
    if cfg.core not in ("agalite", "galite") and (cfg.gate_bias is not None or cfg.attn_eps is not None):
        raise ValueError(f"gate_bias, attn_eps: options of the agalite and galite cores, got core={cfg.core!r}")
    if cfg.num_iterations < 1:
        raise ValueError(f"total_timesteps: expected >= num_envs * num_steps = {cfg.batch_size}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    envs = make_envs(cfg)
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise ValueError(f"env: expected a Discrete action space, got {envs.single_action_space}")
    obs_dim = envs.single_observation_space.shape[0] + int(cfg.step_feature)
    device = torch.device(cfg.device)
    agent = Agent(obs_dim, int(envs.single_action_space.n), cfg).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps)
    segs = SegmentStates(cfg.num_envs, cfg.num_steps, cfg.segment_len)

    T, N = cfg.num_steps, cfg.num_envs
    obs = torch.zeros(T, N, obs_dim, device=device)
    actions = torch.zeros(T, N, dtype=torch.long, device=device)
    logprobs = torch.zeros(T, N, device=device)
    rewards = torch.zeros(T, N, device=device)
    dones = torch.zeros(T, N, device=device)
    values = torch.zeros(T, N, device=device)

    episode_step = np.zeros(N, np.float32)

    def as_obs(o: np.ndarray) -> torch.Tensor:
        if cfg.step_feature:
            o = np.concatenate([np.asarray(o, dtype=np.float32), episode_step[:, None] / 100], axis=1)
        return torch.from_numpy(np.asarray(o, dtype=np.float32)).to(device)

    next_obs = as_obs(envs.reset(seed=cfg.seed)[0])
    next_done = torch.zeros(N, device=device)
    running_return = np.zeros(N, np.float64)
    state = agent.initial_state(N, device)
    curve: list[dict[str, float]] = []
    global_step = 0
    solved_at: int | None = None
    streak = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.num_iterations * cfg.batch_size, unit="step", desc=f"{cfg.core} seed {cfg.seed}")

    for iteration in range(cfg.num_iterations):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.learning_rate * (1.0 - iteration / cfg.num_iterations)
        ep_returns: list[float] = []
        ep_success: list[float] = []
        agent.eval()
        for step in range(T):
            segs.record(step, state)
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                logits, value, state = agent(next_obs, state, next_done)
            dist = Categorical(logits=logits)
            action = dist.sample()
            actions[step], logprobs[step], values[step] = action, dist.log_prob(action), value
            o, r, term, trunc, info = envs.step(action.cpu().numpy())
            rewards[step] = torch.from_numpy(np.asarray(r, dtype=np.float32)).to(device)
            done = np.asarray(term | trunc)
            episode_step = np.where(done, 0.0, episode_step + 1).astype(np.float32)
            next_obs = as_obs(o)
            next_done = torch.from_numpy(done).float().to(device)
            running_return += r
            if done.any():
                ep_returns.extend(running_return[done].tolist())
                running_return[done] = 0.0
                if "success" in info:  # the T-maze's; POPGym has no success flag
                    ep_success.extend(info["success"][done].astype(float).tolist())
        global_step += T * N
        rollout_time = time.perf_counter()

        with torch.no_grad():
            _, next_value, _ = agent(next_obs, state, next_done)
        advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, cfg.gamma, cfg.gae_lambda)

        agent.train()
        clipfracs = []
        replay_err = None
        for _ in range(cfg.update_epochs):
            for env_idx, seg_idx in segs.minibatches(cfg.num_minibatches, shuffle_gen):
                rows = lambda x: segs.rows(x, env_idx, seg_idx)  # noqa: B023 - used inside this loop only
                logits, new_value, _ = agent(rows(obs), segs.initial_states(env_idx, seg_idx), rows(dones))
                dist = Categorical(logits=logits)
                new_logprob = dist.log_prob(rows(actions))
                if replay_err is None:
                    # No optimiser step yet: the replay must give back what the rollout computed.
                    with torch.no_grad():
                        replay_err = max((new_logprob - rows(logprobs)).abs().max().item(),
                                         (new_value - rows(values)).abs().max().item())  # fmt: skip
                    if not replay_err <= cfg.replay_tolerance:
                        raise RuntimeError(
                            f"replay: iteration {iteration + 1}, the replayed minibatch differs from the rollout "
                            f"by {replay_err:.3g} (log-probabilities or values), over replay_tolerance="
                            f"{cfg.replay_tolerance}: the stored states or dones do not reproduce the rollout"
                        )
                log_ratio = new_logprob - rows(logprobs)
                ratio = log_ratio.exp()
                with torch.no_grad():
                    clipfracs.append(((ratio - 1.0).abs() > cfg.clip_coef).float().mean().item())
                adv = rows(advantages)
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                v_loss = 0.5 * ((new_value - rows(returns)) ** 2).mean()
                entropy = dist.entropy().mean()
                loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()

        now = time.perf_counter()
        mean_return = float(np.mean(ep_returns)) if ep_returns else float("nan")
        reached = bool(ep_returns) and mean_return >= cfg.target_return
        streak = streak + 1 if reached else 0
        if solved_at is None and reached:
            solved_at = global_step
        point = {
            "iteration": iteration + 1,
            "global_step": global_step,
            "mean_return": mean_return,
            "success_rate": float(np.mean(ep_success)) if ep_success else float("nan"),
            "episodes": len(ep_returns),
            "sps": global_step / (now - start),
            "wall_s": now - start,
            "update_s": now - rollout_time,
            "pg_loss": pg_loss.item(),
            "v_loss": v_loss.item(),
            "entropy": entropy.item(),
            "clipfrac": float(np.mean(clipfracs)),
            "replay_err": replay_err,
        }
        curve.append(point)
        if bar is not None:
            bar.update(T * N)
            bar.set_postfix(ret=f"{mean_return:.2f}", sps=f"{point['sps']:.0f}")
        if cfg.stop_after_target and streak >= cfg.stop_after_target:
            break
    if bar is not None:
        bar.close()

    result = {
        "config": dataclasses.asdict(cfg),
        "curve": curve,
        "final_return": curve[-1]["mean_return"],
        "steps_to_target": solved_at,
        "wall_s": time.perf_counter() - start,
        "sps": global_step / (time.perf_counter() - start),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if run_dir is not None:
        write_run(run_dir, result)
    return result


def write_run(run_dir: Path, result: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["curve"][0]))
        writer.writeheader()
        writer.writerows(result["curve"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    steps = [p["global_step"] for p in result["curve"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [p["mean_return"] for p in result["curve"]], marker=".")
    ax.axhline(cfg["target_return"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episode return (per rollout)")
    ax.set_ylim(-1.05, 1.05)
    task = f"T-maze corridor {cfg['corridor']}" if cfg.get("env", "tmaze") == "tmaze" else cfg["env"]
    ax.set_title(f"{task}: {cfg['core']}, seed {cfg['seed']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "curve.png", dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[PPOConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(PPOConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "core":
            parser.add_argument(flag, choices=CORES, default=field.default)
        elif field.name == "backend":
            parser.add_argument(flag, choices=("auto", "reference", "triton"), default=None)
        else:
            kind = {"int": int, "float": float, "str": str, "float | None": float}[field.type]
            parser.add_argument(flag, type=kind, default=field.default)
    parser.add_argument(
        "--run-dir", type=Path, default=None,
        help="default: examples/runs/<core>_L<corridor>_s<seed> (T-maze), examples/runs/popgym-<Name>_<core>_s<seed>, "
        "with _ep<n> before _s<seed> for --update-epochs other than 4",
    )  # fmt: skip
    args = vars(parser.parse_args(argv))
    run_dir = args.pop("run_dir")
    cfg = PPOConfig(**args)
    if run_dir is None:
        run_dir = Path(__file__).parent / "runs" / cfg.run_name
    return cfg, run_dir


def main() -> None:
    cfg, run_dir = parse_args()
    result = train(cfg, run_dir)
    print(
        f"env={cfg.env} core={cfg.core} seed={cfg.seed}: final mean return {result['final_return']:.3f}, "
        f"reached {cfg.target_return} at {result['steps_to_target']} steps, "
        f"wall {result['wall_s']:.1f}s, {result['sps']:.0f} SPS -> {run_dir}"
    )


if __name__ == "__main__":
    main()
