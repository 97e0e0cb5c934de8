"""Why does AGaLiTe stay at chance on POPGym's CountRecallEasy? Measurements for the README.

CountRecallEasy deals one card a step (colour red/black, 52 cards, 51 steps) together with a query
colour; the answer to the query of step t, given as the action of step t + 1, is how many cards of that
colour have been dealt so far (0-26). With a normalised read-out ``sum_tau v_tau <k_tau, q> / <s, q>``
(AGaLiTe, and GaLiTe) every written value is weighted by a share that sums to one: a read-out is a
weighted *average* of the past, and the number of matching cards cancels between numerator and
denominator. The parts:

1. ``--probe``: the task without RL. Each core, with a linear head, learns by cross-entropy to output
   the count from the episode's observations (one-hot dealt and query colour, as the PPO example
   flattens them), from the start of every episode. Variants test what the read-out needs: the step
   number as an extra input (an oracle for the missing denominator), a large ``eps`` in the read-out's
   denominator ``2r<s,q> + eps`` (a read-out that keeps the count), the episode-start flag as an input,
   a tick restarted at each episode start, more layers, other eta / r, the GRU gate bias, GaLiTe and
   the LSTM. Printed: accuracy and mean absolute error on fresh episodes, per step bucket.
3. ``--ppo``: PPO as in the README's POPGym table, one change at a time (``HYPOTHESES``).
2. ``--trace``: one trained PPO agent per core on CountRecallEasy, instrumented (see ``trace``):
   gate statistics over episodes, the read-out's weight on each past step, the denominator, the GRU
   gate's mix of attention and skip path, gradient norms reaching the memory and gate projections, and
   the losses per update.

    python examples/diagnose_count.py --probe --seeds 1 2 3
    python examples/diagnose_count.py --trace --train-steps 196608
    python examples/diagnose_count.py --ppo --seeds 1 2 3 --train-steps 200000

writes ``examples/results/countrecall_diagnosis.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
EPISODE = 51  # CountRecallEasy: 52 cards, the first dealt at reset
COUNTS = 27  # answers 0..26


def _ppo() -> Any:
    spec = importlib.util.spec_from_file_location("ppo_memory_count", HERE / "ppo_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ the task itself
def episodes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` CountRecallEasy episodes: observations (n, 52, 4) as the PPO example sees them (one-hot
    dealt colour, one-hot query colour) and the correct answer to each step's query (n, 52): the count
    of the queried colour among the cards dealt so far, this step's included. Both colours come from a
    shuffled deck of 26 + 26, as POPGym deals them."""
    deck = torch.tensor([0] * 26 + [1] * 26)
    dealt = torch.stack([deck[torch.randperm(52, generator=gen)] for _ in range(n)])
    query = torch.stack([deck[torch.randperm(52, generator=gen)] for _ in range(n)])
    red_so_far = torch.cumsum(1 - dealt, dim=1)
    black_so_far = torch.cumsum(dealt, dim=1)
    answer = torch.where(query == 0, red_so_far, black_so_far)
    obs = torch.cat([F.one_hot(dealt, 2), F.one_hot(query, 2)], dim=-1).float()
    return obs, answer


# -------------------------------------------------------------------------------------- 1. the probe
VARIANTS: dict[str, dict[str, Any]] = {
    "agalite": {},
    "agalite +step number": {"step_feature": True},
    "agalite eps=1": {"eps": 1.0},
    "agalite +start flag": {"start_flag": True},
    "agalite tick restart": {"tick_restart": True},
    "agalite r 4 tick restart": {"r": 4, "tick_restart": True},
    "agalite 2 layers": {"n_layers": 2},
    "agalite eta 8": {"eta": 8},
    "agalite r 4": {"r": 4},
    "agalite r 8": {"r": 8},
    "agalite gate bias 0": {"gate_bias": 0.0},
    "galite": {"core": "galite"},
    "galite eps=1": {"core": "galite", "eps": 1.0},
    "lstm": {"core": "lstm"},
}


class ProbeNet(torch.nn.Module):
    """The PPO example's core sizes (d_model 64, 4 heads x 16, d_ffc 64) and a linear head to the counts."""

    def __init__(self, core: str = "agalite", n_layers: int = 1, eta: int = 4, r: int = 2, nu: int = 2,
                 eps: float | None = None, gate_bias: float | None = None, start_flag: bool = False,
                 step_feature: bool = False, tick_restart: bool = False) -> None:  # fmt: skip
        super().__init__()
        from agalite_triton import AGaLiTe, GaLiTe

        self.core, self.start_flag, self.step_feature, self.tick_restart = core, start_flag, step_feature, tick_restart
        in_dim = 4 + int(start_flag) + int(step_feature)
        if core == "lstm":
            self.enc = torch.nn.Linear(in_dim, 64)
            self.net = torch.nn.LSTM(64, 64, batch_first=True)
        else:
            if core == "galite":
                self.net = GaLiTe(in_dim, 64, n_layers, 4, 16, 64, nu, backend="reference")
            else:
                self.net = AGaLiTe(in_dim, 64, n_layers, 4, 16, 64, eta, r, backend="reference")
            for layer in self.net.layers:
                if eps is not None:
                    layer.attn.eps = eps
                if gate_bias is not None:
                    with torch.no_grad():
                        layer.gate1.bgp.fill_(gate_bias)
                        layer.gate2.bgp.fill_(gate_bias)
        self.head = torch.nn.Linear(64, COUNTS)

    def forward(self, obs: torch.Tensor, tick0: torch.Tensor) -> torch.Tensor:
        B, T = obs.shape[:2]
        extra = []
        if self.start_flag:
            extra.append(F.one_hot(torch.zeros(B, dtype=torch.long), T).float().unsqueeze(-1))
        if self.step_feature:
            extra.append((torch.arange(T, dtype=torch.float32) / EPISODE).expand(B, T).unsqueeze(-1))
        x = torch.cat([obs, *extra], dim=-1)
        if self.core == "lstm":
            y = self.net(self.enc(x).relu())[0]
        else:
            state = self.net.initial_state(B)
            if state.has_tick:
                # In a rollout the tick keeps counting across episodes: each episode starts at a random one,
                # or (tick restart) at the initial tick.
                state = state._replace(tick=torch.ones_like(tick0) if self.tick_restart else tick0)
            y = self.net(x, state)[0]
        return self.head(y)


def probe(variant: str, seed: int, steps: int, batch: int = 16) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ProbeNet(**VARIANTS[variant])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        obs, answer = episodes(batch, gen)
        logits = net(obs, torch.randint(1, 10_000, (batch,), generator=gen))
        loss = F.cross_entropy(logits.reshape(-1, COUNTS), answer.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    with torch.no_grad():
        obs, answer = episodes(256, gen)
        pred = net(obs, torch.randint(1, 10_000, (256,), generator=gen)).argmax(-1)
    err = (pred - answer).abs().float()
    buckets = {f"t{a}-{b}": float(err[:, a:b].mean()) for a, b in ((0, 10), (10, 30), (30, 52))}
    # The best answer that ignores the past entirely: the expected count, (t + 1) / 2, rounded.
    blind = ((torch.arange(52) + 1) / 2).round().expand_as(answer)
    return {"variant": variant, "seed": seed, "steps": steps, "accuracy": float((pred == answer).float().mean()),
            "mae": float(err.mean()), "mae_by_step": buckets, "loss_last50": float(np.mean(losses[-50:])),
            "blind_mae": float((blind - answer).abs().mean()),
            "blind_accuracy": float((blind == answer).float().mean()),
            "wall_s": time.perf_counter() - start}  # fmt: skip


# -------------------------------------------------------------------------------------- 2. the trace
def readout_weights(attn: Any, u: torch.Tensor, tick0: int) -> dict[str, Any]:
    """For one AGaLiTe attention layer on one episode's LayerNorm'd inputs ``u`` (T, d_model): the share
    each past step tau gets in the read-out of step t, ``w[t, tau] = <a_{t,tau} G_tau K_tau, Q_t> / <s_t, Q_t>``
    (a the product of the key-side decays between tau and t; r = 1 terms of the oscillators dropped,
    so this is the exact model's share), averaged over heads, and the gates."""
    H, D, eta = attn.n_heads, attn.d_head, attn.eta
    with torch.no_grad():
        z = attn.in_proj(u.unsqueeze(0))[0].double()
        kqvbg = z[:, : attn.n_kqvbg].unflatten(-1, (H, 5, D))
        keys, queries, _, beta, gamma = kqvbg.unbind(-2)
        p1, p2, p3 = z[:, attn.n_kqvbg :].unflatten(-1, (H, 3, eta)).unbind(-2)
        outer = lambda p, x: (p.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # noqa: E731
        K = outer(p1.relu(), keys.relu())
        Q = outer(p2.relu(), queries.relu())
        G = outer(p3.sigmoid(), gamma.sigmoid())
        T = u.shape[0]
        w = torch.zeros(T, T, H, dtype=torch.float64)
        for t in range(T):
            decay = torch.ones(H, K.shape[-1], dtype=torch.float64)
            for tau in range(t, -1, -1):
                w[t, tau] = (decay * G[tau] * K[tau] * Q[t]).sum(-1)
                decay = decay * (1 - G[tau])
        total = w.sum(1, keepdim=True)
        share = torch.where(total > 0, w / total.clamp_min(1e-300), 0.0)
    return {
        "share": share.mean(-1).numpy(),
        "denominator": total[:, 0].mean(-1).numpy(),
        "sigma_gamma_hat": float(G.mean()),
        "sigma_beta": float(beta.sigmoid().mean()),
        "key_decay": float((1 - G).mean()),
        "value_decay": float((1 - beta.sigmoid()).mean()),
        "query_active": float((Q > 0).double().mean()),
    }


def greedy_episodes(ppo: Any, agent: Any, env: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One episode in each of ``n`` fresh copies of ``env``, acted on greedily (argmax) by the trained
    ``agent``: the observations (n, T, obs), the greedy actions (n, T) and each episode's return. Both
    card tasks deal the same cards whatever the actions, and every episode has the same length."""
    envs = ppo.make_popgym_envs(env[len(ppo.POPGYM_PREFIX) :], n)
    o = envs.reset(seed=seed)[0]
    state = agent.initial_state(n, torch.device("cpu"))
    done = torch.zeros(n)
    observations, actions, returns = [], [], np.zeros(n)
    with torch.no_grad():
        while True:
            x = torch.from_numpy(np.asarray(o, dtype=np.float32))
            logits, _, state = agent(x, state, done)
            action = logits.argmax(-1)
            observations.append(x)
            actions.append(action)
            o, reward, term, trunc, _ = envs.step(action.numpy())
            returns += reward
            ended = np.asarray(term | trunc)
            if ended.any():
                if not ended.all():
                    raise RuntimeError(f"{env}: episodes of unequal length; expected every copy to end together")
                break
    envs.close()
    return torch.stack(observations, 1), torch.stack(actions, 1), returns


def trace(core: str, seed: int, steps: int, cfg_kw: dict[str, Any], env: str = "popgym:CountRecallEasy",
          r: int = 2) -> dict[str, Any]:  # fmt: skip
    """Train PPO as the README's table (16 epochs) with probes, then look at the trained agent: its greedy
    return, and for AGaLiTe the read-out's share of each past step and the gates on fresh episodes."""
    diagnose_r = _load("diagnose_r")
    ppo = diagnose_r._ppo()
    agents: list[Any] = []
    base = ppo.Agent

    class Keep(base):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            agents.append(self)

    ppo.Agent = Keep
    try:
        if core == "agalite":
            run = diagnose_r.train_with_probes(ppo, env, r, seed, steps, cfg_kw)
        else:
            result = ppo.train(ppo.PPOConfig(env=env, core=core, seed=seed, total_timesteps=steps, **cfg_kw),
                               progress=False)  # fmt: skip
            run = {key: [p[name] for p in result["curve"]] for key, name in (
                ("returns", "mean_return"), ("entropy", "entropy"), ("pg_loss", "pg_loss"), ("v_loss", "v_loss"))}
    finally:
        ppo.Agent = base
    agent = agents[-1]
    obs, pred, greedy = greedy_episodes(ppo, agent, env, 16, seed + 100)
    row: dict[str, Any] = {"env": env, "core": core, "seed": seed, **({"r": r} if core == "agalite" else {}), **run,
                           "greedy_return": float(greedy.mean()), "greedy_action_spread": int(pred.unique().numel())}
    if env.endswith("CountRecallEasy"):
        # Observations: one-hot dealt colour, one-hot query colour; the answer counts this step's card too.
        dealt, query = obs[..., :2], obs[..., 2:4]
        answer = (dealt.cumsum(1) * query).sum(-1).long()
        row["greedy_accuracy"] = float((pred == answer).float().mean())
        row["greedy_mae"] = float((pred - answer).abs().float().mean())
    if core != "agalite":
        return row
    layer = agent.core.net.layers[0]
    with torch.no_grad():
        u = layer.ln1(F.relu(layer.emb(obs)))
    per_episode = [readout_weights(layer.attn, u[i], tick0=1000 * i) for i in range(obs.shape[0])]
    share = np.mean([p["share"] for p in per_episode], axis=0)  # (T, T)
    T = share.shape[0]
    # The read-out's weight on the step `lag` steps back, averaged over the steps that have one.
    by_lag = [float(np.mean([share[t, t - lag] for t in range(lag, T)])) for lag in range(11)]
    scalars = [k for k in per_episode[0] if k not in ("share", "denominator")]
    return {
        **row, "gates": {k: float(np.mean([p[k] for p in per_episode])) for k in scalars},
        "share_own_step": by_lag[0],
        "share_last5": float(np.mean([share[t, max(0, t - 5) : t].sum() for t in range(1, T)])),
        "share_older": float(np.mean([share[t, : max(0, t - 5)].sum() for t in range(6, T)])),
        "share_by_lag": by_lag, "denominator_by_step": np.mean([p["denominator"] for p in per_episode], 0).tolist(),
    }  # fmt: skip


# ------------------------------------------------------------------------- 3. PPO, one change at a time
# Each hypothesis is one change to the README table's setting (PPOConfig defaults, 16 epochs, 196,608
# steps); the table's own runs give the unchanged agalite r 2 / r 4 / r 8, LSTM and MLP rows.
HYPOTHESES: dict[str, dict[str, Any]] = {
    "agalite": {},
    "agalite 2 layers": {"n_layers": 2},
    "agalite eta 8": {"eta": 8},
    "agalite gate bias 0": {"gate_bias": 0.0},
    "agalite lr 3e-4": {"learning_rate": 3e-4},
    "agalite 4 epochs": {"update_epochs": 4},
    "agalite +start flag": {"start_flag": True},
    "agalite tick restart": {"tick_restart": True},
    "agalite r 4 tick restart": {"r": 4, "tick_restart": True},
    "agalite eps=1": {"attn_eps": 1.0},
    "agalite +step number": {"step_feature": True},
    "lstm +step number": {"core": "lstm", "step_feature": True},
    "galite": {"core": "galite"},
    # Controls for how PPO's signal reaches the answer: the step number given to the memoryless MLP (can
    # PPO learn the step-number-only answer at this budget at all?), and no discount (the answers do not
    # change what is dealt next, so gamma 0 is the right credit assignment: each answer's advantage is
    # its own reward, without the later answers' noise).
    "none +step number": {"core": "none", "step_feature": True},
    "agalite gamma 0": {"gamma": 0.0},
    "lstm gamma 0": {"core": "lstm", "gamma": 0.0},
    "galite gamma 0": {"core": "galite", "gamma": 0.0},
    "agalite eps=1 gamma 0": {"attn_eps": 1.0, "gamma": 0.0},
}


def ppo_run(env: str, name: str, seed: int, steps: int, r: int = 2) -> dict[str, Any]:
    """One PPO run of hypothesis ``name``; ``r`` is AGaLiTe's wherever the hypothesis does not set its own."""
    ppo = _ppo()
    overrides = {"update_epochs": 16, **({"r": r} if HYPOTHESES[name].get("core", "agalite") == "agalite" else {}),
                 **HYPOTHESES[name]}  # fmt: skip
    cfg = ppo.PPOConfig(env=env, seed=seed, total_timesteps=steps, **overrides)
    result = ppo.train(cfg, progress=False)
    returns = [p["mean_return"] for p in result["curve"]]
    return {"env": env, "hypothesis": name, "seed": seed, "overrides": overrides, "returns": returns,
            "steps": [p["global_step"] for p in result["curve"]], "last5": float(np.nanmean(returns[-5:])),
            "wall_s": result["wall_s"], "sps": result["sps"],
            "max_replay_err": max(p["replay_err"] for p in result["curve"])}  # fmt: skip


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"{name}_count", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--probe-steps", type=int, default=600)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--trace-cores", nargs="*", default=["agalite", "lstm"])
    parser.add_argument("--train-steps", type=int, default=196_608)
    parser.add_argument("--ppo", action="store_true")
    parser.add_argument("--hypotheses", nargs="*", default=list(HYPOTHESES))
    parser.add_argument("--env", default="popgym:CountRecallEasy")
    parser.add_argument("--r", type=int, default=2, help="AGaLiTe's r in every --ppo hypothesis that sets none")
    parser.add_argument("--seeds", type=int, nargs="*", default=[1])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "countrecall_diagnosis.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.probe:
        rows = out.setdefault("probe", [])
        for variant in args.variants:
            for seed in args.seeds:
                row = probe(variant, seed, args.probe_steps)
                rows[:] = [r for r in rows if (r["variant"], r["seed"]) != (variant, seed)] + [row]
                print(f"{variant:24s} seed {seed}: accuracy {row['accuracy']:.3f}  MAE {row['mae']:.2f} "
                      f"{row['mae_by_step']}  blind accuracy {row['blind_accuracy']:.3f} MAE {row['blind_mae']:.2f} "
                      f"({row['wall_s']:.0f} s)", flush=True)
                args.out.write_text(json.dumps(out, indent=1))
    if args.trace:
        rows = out.setdefault("trace", [])
        for core in args.trace_cores:
            for seed in args.seeds:
                row = trace(core, seed, args.train_steps, {"update_epochs": 16}, args.env, args.r)
                key = (args.env, core, seed)
                rows[:] = [r for r in rows if (r.get("env", args.env), r["core"], r["seed"]) != key] + [row]
                print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
                args.out.write_text(json.dumps(out, indent=1))
    if args.ppo:
        rows = out.setdefault("ppo", [])
        for name in args.hypotheses:
            for seed in args.seeds:
                row = ppo_run(args.env, name, seed, args.train_steps, args.r)
                key = (row["env"], name, seed)
                rows[:] = [r for r in rows if (r["env"], r["hypothesis"], r["seed"]) != key] + [row]
                print(f"{args.env} {name:24s} seed {seed}: last-5 return {row['last5']:.3f} "
                      f"({row['wall_s']:.0f} s, replay err {row['max_replay_err']:.2g})", flush=True)
                args.out.write_text(json.dumps(out, indent=1))
    summary = defaultdict(list)
    for row in out.get("probe", []):
        summary[row["variant"]].append((row["accuracy"], row["mae"]))
    for variant, vals in summary.items():
        acc, mae = np.array(vals).T
        print(f"{variant:24s} accuracy {acc.mean():.3f} ± {acc.std():.3f}  MAE {mae.mean():.2f} ± {mae.std():.2f}")


if __name__ == "__main__":
    main()
