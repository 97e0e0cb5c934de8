"""Why does the number of oscillators r change what PPO learns? Measurements for the README.

Three parts, each for every r asked for:

1. The oscillators. omega = linspace(-pi, pi, r) is symmetric and cos is even, so omega_j and
   omega_{r-1-j} give the same coefficients: only ceil(r / 2) of the r memory slices are distinct.
   The read-out pairs tilde_v_j with tilde_k_j, so a value written at tick a and a key written at
   tick b meet with the weight sum_j cos(a w_j) cos(b w_j) = (f(a - b) + f(a + b)) / 2, where
   f(n) = sum_j cos(n w_j) equals r (-1)^n when (r - 1) divides n and (-1)^n otherwise. Printed:
   f(n) over one period, measured from the package's own oscillator table, and that table against
   a float64 ``numpy.cos(tick * linspace(-pi, pi, r))``.
2. The read-out at initialisation, on real observations of the environment: the PPO agent of
   ``ppo_memory.py`` (the same parameters for every r, checked) runs one rollout of random actions.
   From the first layer's projections, a float64 transcription of the recurrence gives the read-out
   y_r = sum_j tilde_v_j <tilde_k_j, q> / (2 r <s, q>), checked against the package's output, and the
   exact gated linear attention it approximates (GaLiTe: the memory sum_tau v_tau (x) K_tau with the
   same decays), y_exact = C q / <s, q>. Printed: the sizes of the numerator and of 2r<s,q>, the
   gain g = <y_r, y_exact> / <y_exact, y_exact> (how much of the exact read-out comes through) and the
   relative size of the rest, |y_r - g y_exact| / |g y_exact| (interference between steps).
3. Training: ``ppo_memory.train`` with hooks that record, per update, the gradient norm of every
   parameter group before clipping (and its per-element RMS, to set against Adam's eps), and, per
   rollout, the size of the read-out, of the attention branch and the opening of the GRU gate after
   attention.
4. With ``--cost``: state bytes per environment and, side by side in one process, rollout and
   training throughput of the example's model for several (eta, r).
5. With ``--recall-lags``: the same model trained without RL (cross-entropy) to output the input
   shown ``lag`` steps earlier, to separate what the architecture can represent from what PPO finds.
6. With ``--ppo-lag``: PPO as in the README's table on POPGym's RepeatPrevious moved to another lag
   (``--ppo-update-epochs 16`` for the README's main setting).

    python examples/diagnose_r.py --env popgym:RepeatPreviousEasy --rs 2 4 8 --train-steps 98304

writes ``examples/results/popgym_diagnose_r.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agalite_triton.oscillator import oscillator_period, oscillator_table

HERE = Path(__file__).resolve().parent


def _ppo() -> Any:
    spec = importlib.util.spec_from_file_location("ppo_memory_diag", HERE / "ppo_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ 1. oscillators
def oscillators(r: int) -> dict[str, Any]:
    period = oscillator_period(r)
    table = oscillator_table(r).double().numpy()  # (r, P)
    ticks = np.arange(0, 4 * period + 1)
    exact = np.cos(np.outer(np.linspace(-np.pi, np.pi, r), ticks))
    lag_kernel = [float(table[:, n % period].sum()) for n in range(period + 1)]
    distinct = len({tuple(np.round(row, 12)) for row in table})
    return {
        "r": r,
        "period": period,
        "distinct_oscillators": distinct,
        "table_vs_numpy_max_abs": float(np.abs(table[:, ticks % period] - exact).max()),
        "lag_kernel_f": [round(v, 6) for v in lag_kernel],
    }


# --------------------------------------------------------------------------------- 2. init read-out
def _split(z: torch.Tensor, H: int, D: int, eta: int) -> tuple[torch.Tensor, ...]:
    n = 5 * H * D
    k, q, v, b, g = z[..., :n].unflatten(-1, (H, 5, D)).unbind(-2)
    p1, p2, p3 = z[..., n:].unflatten(-1, (H, 3, eta)).unbind(-2)
    return k, q, v, b, g, p1, p2, p3


def _outer(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (p.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def readout_terms(z: torch.Tensor, dones: torch.Tensor, tick0: int, H: int, D: int, eta: int, r: int) -> dict:
    """Float64 transcription of one layer's recurrence from zero memory, and the exact GaLiTe memory."""
    k, q, v, b, g, p1, p2, p3 = (t.double() for t in _split(z, H, D, eta))
    B, T = z.shape[:2]
    K = _outer(p1.relu(), k.relu())
    Q = _outer(p2.relu(), q.relu())
    G = _outer(p3.sigmoid(), g.sigmoid())
    beta = b.sigmoid()
    omegas = torch.linspace(-math.pi, math.pi, r, dtype=torch.float64)
    E = eta * D
    tk = torch.zeros(B, r, H, E, dtype=torch.float64)
    tv = torch.zeros(B, r, H, D, dtype=torch.float64)
    s = torch.zeros(B, H, E, dtype=torch.float64)
    C = torch.zeros(B, H, D, E, dtype=torch.float64)
    num, den, y_r, y_ex = [], [], [], []
    for t in range(T):
        keep = (1.0 - dones[:, t].double()).view(B, 1, 1)
        c = torch.cos((tick0 + t + 1) * omegas).view(1, r, 1, 1)
        dk, dv = (1 - G[:, t]) * keep, (1 - beta[:, t]) * keep
        kin, vin = G[:, t] * K[:, t], beta[:, t] * v[:, t]
        tk = dk.unsqueeze(1) * tk + c * kin.unsqueeze(1)
        tv = dv.unsqueeze(1) * tv + c * vin.unsqueeze(1)
        s = dk * s + kin
        C = (dv.unsqueeze(-1) * dk.unsqueeze(-2)) * C + vin.unsqueeze(-1) * kin.unsqueeze(-2)
        qt = Q[:, t]
        n_t = (tv * (tk * qt.unsqueeze(1)).sum(-1, keepdim=True)).sum(1)  # (B, H, D)
        sq = (s * qt).sum(-1, keepdim=True)  # (B, H, 1)
        num.append(n_t)
        den.append(2 * r * sq)
        y_r.append(n_t / (2 * r * sq + 1e-5))
        y_ex.append(torch.where(sq > 0, (C @ qt.unsqueeze(-1)).squeeze(-1) / sq.clamp_min(1e-300), 0.0))
    stack = lambda xs: torch.stack(xs, 1)  # noqa: E731
    return {"num": stack(num), "den": stack(den), "y_r": stack(y_r), "y_exact": stack(y_ex), "v": v}


def init_readout(ppo: Any, env: str, rs: list[int], seed: int, cfg_kw: dict) -> list[dict]:
    results = []
    reference_params = None
    cfg0 = ppo.PPOConfig(env=env, seed=seed, **cfg_kw)
    envs = ppo.make_envs(cfg0)
    obs_dim, n_actions = envs.single_observation_space.shape[0], int(envs.single_action_space.n)
    rng = np.random.default_rng(seed)
    o, _ = envs.reset(seed=seed)
    T, N = cfg0.num_steps, cfg0.num_envs
    obs, dones = np.zeros((N, T, obs_dim), np.float32), np.zeros((N, T), np.float32)
    done = np.zeros(N, bool)
    for t in range(T):
        obs[:, t], dones[:, t] = o, done
        o, _, term, trunc, _ = envs.step(rng.integers(0, n_actions, N))
        done = term | trunc
    x, d = torch.from_numpy(obs), torch.from_numpy(dones)
    for r in rs:
        cfg = ppo.PPOConfig(env=env, seed=seed, core="agalite", r=r, **cfg_kw)
        torch.manual_seed(seed)
        agent = ppo.Agent(obs_dim, n_actions, cfg)
        params = {k: p.detach().clone() for k, p in agent.state_dict().items()}
        if reference_params is None:
            reference_params = params
        same_init = all(torch.equal(params[k], reference_params[k]) for k in params)
        layer = agent.core.net.layers[0]
        captured: dict[str, torch.Tensor] = {}
        h1 = layer.attn.in_proj.register_forward_hook(lambda m, i, out, c=captured: c.__setitem__("z", out.detach()))
        h2 = layer.attn.project.register_forward_hook(lambda m, i, out, c=captured: c.__setitem__("y", i[0].detach()))
        with torch.no_grad():
            agent(x, agent.initial_state(N, torch.device("cpu")), d)
        h1.remove()
        h2.remove()
        H, D, eta = cfg.n_heads, cfg.d_head, cfg.eta
        terms = readout_terms(captured["z"], d, 1, H, D, eta, r)
        y_pkg = captured["y"].double().unflatten(-1, (H, D))
        y_r, y_ex = terms["y_r"], terms["y_exact"]
        gain = float((y_r * y_ex).sum() / (y_ex * y_ex).sum())
        rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
        results.append({
            "r": r,
            "same_init_as_first_r": same_init,
            "package_vs_float64_max_abs": float((y_pkg - y_r).abs().max()),
            "rms_numerator": rms(terms["num"]),
            "rms_denominator_2r_sq": rms(terms["den"]),
            "rms_readout": rms(y_r),
            "rms_exact_readout": rms(y_ex),
            "rms_values": rms(terms["v"]),
            "gain": gain,
            "interference": float((y_r - gain * y_ex).norm() / (gain * y_ex).norm()),
            "cosine_to_exact": float((y_r * y_ex).sum() / (y_r.norm() * y_ex.norm())),
        })  # fmt: skip
    return results


# ---------------------------------------------------------------------------------------- 3. training
def _row_groups(model_cfg: Any) -> list[str]:
    H, D, eta = model_cfg.n_heads, model_cfg.d_head, model_cfg.eta
    names = ["keys", "queries", "values", "beta", "gamma"]
    rows = [names[(i % (5 * D)) // D] for i in range(5 * H * D)]
    rows += [("p1", "p2", "p3")[(i % (3 * eta)) // eta] for i in range(3 * H * eta)]
    return rows


GROUPS = (("actor", "actor"), ("critic", "critic"), (".emb.", "embedding"), ("ln", "layernorms"),
          ("gate1", "gate1"), ("gate2", "gate2"), ("ffn", "ffn"), ("project", "attn.project"))  # fmt: skip


def _group(name: str) -> str:
    for key, label in GROUPS:
        if key in name:
            return label
    return "other"


def train_with_probes(ppo: Any, env: str, r: int, seed: int, steps: int, cfg_kw: dict) -> dict:
    agents: list[Any] = []
    base_agent = ppo.Agent

    class RecordingAgent(base_agent):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            agents.append(self)

    per_update: dict[str, list[float]] = defaultdict(list)
    rollout: dict[str, list[float]] = defaultdict(list)
    iteration_grads: list[dict[str, float]] = []
    iteration_rollout: list[dict[str, float]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters: Any, max_norm: float, *a: Any, **k: Any) -> torch.Tensor:
        agent = agents[-1]
        sq: dict[str, float] = defaultdict(float)
        numel: dict[str, int] = defaultdict(int)
        for name, p in agent.named_parameters():
            if p.grad is None:
                continue
            g2 = p.grad.detach().double().pow(2)
            if name.endswith("attn.in_proj.weight") or name.endswith("attn.in_proj.bias"):
                per_row = g2.sum(1) if g2.dim() == 2 else g2
                for label, mask in row_masks.items():
                    sq["in_proj." + label] += float(per_row[mask].sum())
                    numel["in_proj." + label] += int(mask.sum()) * (g2.shape[1] if g2.dim() == 2 else 1)
            else:
                sq[_group(name)] += float(g2.sum())
                numel[_group(name)] += g2.numel()
        total = clip(parameters, max_norm, *a, **k)
        for label, value in sq.items():
            per_update[label].append(math.sqrt(value))
            # Per-element RMS, to set against Adam's eps (a gradient below it gets a smaller step).
            per_update["rms/" + label].append(math.sqrt(value / numel[label]))
        per_update["total"].append(float(total))
        return total

    def on_project(module: Any, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():  # rollout steps only
            rollout["readout_rms"].append(float(inputs[0].pow(2).mean().sqrt()))
            rollout["attn_branch_rms"].append(float(output.relu().pow(2).mean().sqrt()))

    def on_gate1(module: Any, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            x, y = inputs
            z_y = module.w_y(y).chunk(3, dim=-1)[1]
            z_x = module.u_x(x).chunk(2, dim=-1)[1]
            rollout["gate1_z"].append(float(torch.sigmoid(z_y + z_x - module.bgp).mean()))

    cfg = ppo.PPOConfig(env=env, core="agalite", r=r, seed=seed, total_timesteps=steps, **cfg_kw)
    rows = _row_groups(cfg)
    row_masks = {label: torch.tensor([lbl == label for lbl in rows]) for label in sorted(set(rows))}
    hooks_done = []
    original_train_mode = base_agent.train

    def train_mode(self: Any, mode: bool = True) -> Any:
        # First call of agent.train() happens after the first rollout: flush per-iteration stats there.
        if not hooks_done:
            layer = self.core.net.layers[0]
            layer.attn.project.register_forward_hook(on_project)
            layer.gate1.register_forward_hook(on_gate1)
            hooks_done.append(True)
        if not mode and per_update:  # agent.eval() at the start of a rollout: close the previous update
            iteration_grads.append({k: float(np.mean(v)) for k, v in per_update.items()})
            per_update.clear()
        if mode and rollout:
            iteration_rollout.append({k: float(np.mean(v)) for k, v in rollout.items()})
            rollout.clear()
        return original_train_mode(self, mode)

    ppo.Agent = RecordingAgent
    RecordingAgent.train = train_mode
    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        result = ppo.train(cfg, progress=False)
    finally:
        ppo.Agent = base_agent
        torch.nn.utils.clip_grad_norm_ = clip
    if per_update:
        iteration_grads.append({k: float(np.mean(v)) for k, v in per_update.items()})
    returns = [p["mean_return"] for p in result["curve"]]
    losses = {key: [p[key] for p in result["curve"]] for key in ("entropy", "pg_loss", "v_loss")}
    return {"r": r, "seed": seed, "returns": returns, "grad_norms": iteration_grads, "rollout": iteration_rollout,
            "sps": result["sps"], **losses}  # fmt: skip


# ---------------------------------------------------------------------------- 5. supervised recall
def recall(r: int, lag: int, seed: int, steps: int = 400, batch: int = 16, length: int = 48, eta: int = 4,
           adam_eps: float = 1e-8) -> dict:
    """RepeatPrevious without RL: the example's 1-layer AGaLiTe and a linear head learn, by cross-entropy
    with Adam, to output the one-hot suit (of 4) shown ``lag`` steps earlier. Every row starts from zero
    memory at a random tick (in a rollout the tick keeps counting across episodes). Returns the
    accuracy on fresh sequences over the steps t >= lag (chance 0.25)."""
    from agalite_triton import AGaLiTe

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AGaLiTe(4, d_model=64, n_layers=1, n_heads=4, d_head=16, d_ffc=64, eta=eta, r=r, backend="reference")
    head = torch.nn.Linear(64, 4)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3, eps=adam_eps)

    def batch_of(n: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        suits = torch.randint(0, 4, (n, length), generator=gen)
        state = model.initial_state(n)
        state = state._replace(tick=torch.randint(0, 10_000, (n,), generator=gen))
        return torch.nn.functional.one_hot(suits, 4).float(), suits, state

    for _ in range(steps):
        x, suits, state = batch_of(batch)
        logits = head(model(x, state)[0])[:, lag:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), suits[:, :-lag].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, suits, state = batch_of(256)
        pred = head(model(x, state)[0])[:, lag:].argmax(-1)
        accuracy = float((pred == suits[:, :-lag]).float().mean())
    return {"r": r, "lag": lag, "seed": seed, "eta": eta, "steps": steps, "accuracy": accuracy,
            "final_loss": float(loss)}  # fmt: skip


# ------------------------------------------------------------------------ 6. PPO at another lag
def register_repeat_previous(lag: int) -> str:
    """POPGym's RepeatPrevious with the answer ``lag`` steps before the current observation, registered
    as ``popgym:RepeatPreviousLag<lag>``. (POPGym's k counts the current card: RepeatPreviousEasy,
    k = 4, asks for the suit shown 3 steps before the current one.)"""
    import popgym.envs
    from popgym.envs.repeat_previous import RepeatPrevious

    name = f"RepeatPreviousLag{lag}"

    def __init__(self: Any) -> None:
        RepeatPrevious.__init__(self, num_decks=1, k=lag + 1)

    if not any(cls.__name__ == name for cls in popgym.envs.ALL):
        popgym.envs.ALL[type(name, (RepeatPrevious,), {"__init__": __init__})] = {"id": f"popgym-{name}-v0"}
    return name


# ------------------------------------------------------------------------------------------ 4. cost
def cost(pairs: list[tuple[int, int]], rounds: int = 15, reps: int = 20) -> list[dict]:
    """Side-by-side cost of the example's 1-layer model per (eta, r): state bytes, one in-place rollout
    step of 32 envs and one forward + backward over 8 x 128, interleaved over rounds, median."""
    import time

    from agalite_triton import AGaLiTe

    models = {}
    for eta, r in pairs:
        torch.manual_seed(0)
        models[(eta, r)] = AGaLiTe(4, d_model=64, n_layers=1, n_heads=4, d_head=16, d_ffc=64, eta=eta, r=r,
                                   backend="reference")  # fmt: skip
    times: dict[tuple[int, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    x1, d1 = torch.rand(32, 4), torch.zeros(32, dtype=torch.bool)
    xs, ds = torch.rand(8, 128, 4), torch.rand(8, 128) < 0.02
    for _ in range(rounds):
        for key, model in models.items():
            state = model.initial_state(32)
            with torch.no_grad():
                model(x1, state, d1, out=state)
                start = time.perf_counter()
                for _ in range(reps):
                    model(x1, state, d1, out=state)
                times[key]["step"].append((time.perf_counter() - start) / reps)
            init = model.initial_state(8)
            model(xs, init, ds)[0].sum().backward()
            start = time.perf_counter()
            for _ in range(3):
                model(xs, init, ds)[0].sum().backward()
            times[key]["train"].append((time.perf_counter() - start) / 3)
    rows = []
    for (eta, r), model in models.items():
        step, train = (float(np.median(times[(eta, r)][k])) for k in ("step", "train"))
        rows.append({"eta": eta, "r": r, "state_bytes_per_env": model.state_bytes_per_env,
                     "rollout_env_steps_per_s": 32 / step, "train_samples_per_s": 8 * 128 / train})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="popgym:RepeatPreviousEasy")
    parser.add_argument("--rs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--train-steps", type=int, default=98_304, help="0: skip part 3")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "popgym_diagnose_r.json")
    parser.add_argument("--cost", action="store_true", help="also part 4: state size and speed per (eta, r)")
    parser.add_argument("--recall-lags", type=int, nargs="*", default=[], help="part 5 for these lags")
    parser.add_argument("--recall-steps", type=int, default=400)
    parser.add_argument("--ppo-lag", type=int, default=None,
                        help="part 6: PPO (--ppo-steps) on RepeatPrevious at this lag, for --rs and --seeds")
    parser.add_argument("--ppo-steps", type=int, default=200_000)
    parser.add_argument("--ppo-update-epochs", type=int, default=4,
                        help="part 6: PPO epochs per rollout (as ppo_memory.py --update-epochs)")
    parser.add_argument("--skip-init", action="store_true", help="skip parts 1 and 2")
    args = parser.parse_args()
    ppo = _ppo()
    cfg_kw = dict(threads=1, backend="reference")
    torch.set_num_threads(1)

    report: dict[str, Any] = {"env": args.env}
    if not args.skip_init:
        report["oscillators"] = [oscillators(r) for r in args.rs]
        for row in report["oscillators"]:
            print(row)
        report["init_readout"] = init_readout(ppo, args.env, args.rs, args.seeds[0], cfg_kw)
        for row in report["init_readout"]:
            print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()})
    if args.ppo_lag is not None:
        env = "popgym:" + register_repeat_previous(args.ppo_lag)
        report["ppo_lag"] = []
        for seed in args.seeds:
            for r in args.rs:
                cfg = ppo.PPOConfig(env=env, core="agalite", r=r, seed=seed, total_timesteps=args.ppo_steps,
                                    update_epochs=args.ppo_update_epochs, **cfg_kw)  # fmt: skip
                result = ppo.train(cfg, run_dir=HERE / "runs" / cfg.run_name, progress=False)
                report["ppo_lag"].append({"r": r, "seed": seed, "update_epochs": cfg.update_epochs,
                                          "final": result["final_return"]})  # fmt: skip
                print(report["ppo_lag"][-1], flush=True)
    report["training"] = []
    if args.train_steps:
        for seed in args.seeds:
            for r in args.rs:
                run = train_with_probes(ppo, args.env, r, seed, args.train_steps, cfg_kw)
                report["training"].append(run)
                first, last = run["grad_norms"][0], run["grad_norms"][-1]
                print(f"r={r} seed={seed}: final return {run['returns'][-1]:.3f}")
                print("  grad norms, first update:", {k: round(v, 4) for k, v in sorted(first.items())})
                print("  grad norms, last update: ", {k: round(v, 4) for k, v in sorted(last.items())})
                print("  rollout probes, first / last:", run["rollout"][0], run["rollout"][-1])
    report["recall"] = []
    for lag in args.recall_lags:
        for seed in args.seeds:
            for r in args.rs:
                row = recall(r, lag, seed, steps=args.recall_steps)
                report["recall"].append(row)
                print(row, flush=True)
    if args.cost:
        import os

        pairs = [(4, r) for r in (2, 3, 4, 5, 8, 16)] + [(2, 4), (8, 4)]
        report["cost"] = cost(pairs)
        report["cost_load_average"] = os.getloadavg()
        for row in report["cost"]:
            print({k: (round(v) if isinstance(v, float) else v) for k, v in row.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("->", args.out)


if __name__ == "__main__":
    main()
