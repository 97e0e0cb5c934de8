"""Both recurrent cores, AGaLiTe and GaLiTe, built tiny for tests that hold for either: the call
conventions of :class:`~agalite_triton.stack.RecurrentStack`, the properties and the framework adapters.

``KINDS`` is what such tests parametrize over; ``CORE_SIZES`` the sizes only one model has.
"""

from __future__ import annotations

import torch

from agalite_triton import AGaLiTe, GaLiTe
from agalite_triton.stack import RecurrentStack
from agalite_triton.state import StateOps

KINDS = ("agalite", "galite")
MODELS: dict[str, type[RecurrentStack]] = {"agalite": AGaLiTe, "galite": GaLiTe}
# r = 4: AGaLiTe's oscillator period is 6, so ticks matter; nu = 2: GaLiTe's K = 2 D.
CORE_SIZES: dict[str, dict[str, int]] = {"agalite": dict(eta=2, r=4), "galite": dict(nu=2)}


def make_core(kind: str, seed: int = 0, **sizes) -> RecurrentStack:
    """A core of ``kind`` with the given sizes (``eta``/``r`` or ``nu`` default to ``CORE_SIZES``), seeded."""
    own = {k: v for k, v in CORE_SIZES[kind].items() if k not in sizes}
    # The other model's own sizes are dropped, so one table of sizes can build either core.
    foreign = {k for other in KINDS if other != kind for k in CORE_SIZES[other]}
    torch.manual_seed(seed)
    return MODELS[kind](**own, **{k: v for k, v in sizes.items() if k not in foreign})


def model_kind(model: RecurrentStack) -> str:
    return next(kind for kind, cls in MODELS.items() if type(model) is cls)


def busy_state(model: RecurrentStack, batch: int, seed: int = 1, tick: torch.Tensor | None = None) -> StateOps:
    """A non-zero state with distinct ticks (where the model has them), so that a wrong env, layer or tick
    shows. Normalisers (``s``) are positive, as the recurrence keeps them; the other memories any sign."""
    g = torch.Generator().manual_seed(seed)
    init = model.initial_state(batch)
    mems = [
        torch.rand(t.shape, generator=g, dtype=t.dtype) if name == "s" else torch.randn(t.shape, generator=g, dtype=t.dtype)
        for name, t in zip(init._fields, init.memories())
    ]
    if not model.has_tick:
        return model.state_class(*mems)
    if tick is None:
        tick = torch.tensor([1, 5, 8, 100, 2**40, 7, 3, 11, -4, 2**62])[:batch] if batch <= 10 else torch.arange(batch) + 3
    return model.state_class(*mems, tick)


def fresh_state(model: RecurrentStack, batch: int, tick: torch.Tensor | None = None) -> StateOps:
    """The initial state, carrying ``tick`` where the model has one (a done zeroes the memory, not the tick)."""
    init = model.initial_state(batch)
    return init._replace(tick=tick) if model.has_tick and tick is not None else init


def states_equal(a: StateOps, b: StateOps) -> bool:
    return type(a) is type(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def assert_states_close(a: StateOps, b: StateOps, **tol) -> None:
    """Memories within ``tol``, ticks (where there are any) exactly equal."""
    assert type(a) is type(b), (type(a), type(b))
    for name, x, y in zip(a._fields, a.memories(), b.memories()):
        torch.testing.assert_close(x, y, **tol, msg=lambda m, name=name: f"{name}: {m}")
    if a.has_tick:
        assert torch.equal(a.tick, b.tick)
