"""TorchRL adapter: :class:`AGaLiTeModule` stands where ``torchrl.modules.LSTMModule`` stands, with an
:class:`~agalite_triton.AGaLiTe` or a :class:`~agalite_triton.GaLiTe` core.

Needs ``pip install -e ".[torchrl]"`` (torchrl 0.14.1, tensordict 0.14.3); ``import agalite_triton`` never
imports this module.

What TorchRL's conventions mean here (torchrl 0.14.1):

* The environment needs ``InitTracker()`` (it writes ``"is_init"``) and :meth:`AGaLiTeModule.make_tensordict_primer`
  (it zero-fills the state key at every reset; a zero packed state is exactly ``model.initial_state``).
* **Acting mode** (``recurrent_mode`` False: collectors). Every frame is one step from the state stored in
  ``state_key``; where ``"is_init"`` is set that state is replaced by zeros (the initial state), as
  ``LSTMModule`` zeroes its hidden state. The new state goes to ``("next", state_key)``, which the
  collector's ``step_mdp`` carries to the next frame's root.
* **Recurrent mode** (``set_recurrent_mode(True)``; TorchRL's losses enter it themselves): the tensordict is
  ``[*B, T]`` with time last. Each row starts from the state stored at its first frame, and wherever
  ``"is_init"`` is set at t >= 1 it *restarts from the state stored at frame t*, as ``LSTMModule`` splits
  rows at ``is_init`` and starts each piece from its stored hidden state. This is not a done: GAE's
  next-value pass sets ``("next", "is_init")`` to ``next.is_init | root.is_init``, so there it marks frames
  whose stored ``("next", state_key)`` is mid-episode. One model call, no padding: the restart rows are
  passed to ``model(..., restart=, restart_state=)``.
* The state is stored per frame twice, at the root and under ``"next"``: ``2 * 4 * model.state_size``
  bytes per frame in float32 (AGaLiTe's paper preset: 114,696 bytes; GaLiTe's galite-tmaze: 1,064,960).
* GAE vmaps its value network by default; like TorchRL's RNN modules this one cannot run under
  ``torch.vmap`` (restart points are data-dependent), so build ``GAE(..., deactivate_vmap=True)``. Under
  vmap the module raises an error saying so.

Differences from ``LSTMModule``: in recurrent mode the module writes only ``out_key``. ``LSTMModule`` writes
a per-frame hidden state there that is zero except at each trajectory's last frame (its docs say not to
trust it); here that tensor would be ``B * T * state_size`` floats. In acting mode both write the
new state to ``("next", state_key)``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, dispatch
from tensordict.utils import NestedKey
from torchrl.data.tensor_specs import Unbounded
from torchrl.envs.transforms import TensorDictPrimer
from torchrl.modules.tensordict_module.rnn import recurrent_mode as _recurrent_mode

from .stack import RecurrentStack

__all__ = ["AGaLiTeModule"]


def _is_vmapped(x: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(x))


class AGaLiTeModule(TensorDictModuleBase):
    """An :class:`~agalite_triton.AGaLiTe` or :class:`~agalite_triton.GaLiTe` core as a TensorDict module
    with a packed recurrent state.

    in_keys ``[in_key, state_key, "is_init"]``, out_keys ``[out_key, ("next", state_key)]``. The state is
    ``model.pack_state(...)``: (S,) float per frame, ``S = model.state_size``; zeros are the initial state.

    Args:
        model: the core (any :class:`~agalite_triton.stack.RecurrentStack`). Its output (``model.d_model``
            features) goes to ``out_key``.
        in_key: the observation (or embedding) key, ``(*batch, input_dim)`` per frame.
        out_key: where the features go.
        state_key: the packed state's key (the primer and ``("next", state_key)`` use it too).
        default_recurrent_mode: the mode when no ``set_recurrent_mode`` context is active (default False).
    """

    def __init__(
        self,
        model: RecurrentStack,
        in_key: NestedKey,
        out_key: NestedKey,
        state_key: str = "recurrent_state_agalite",
        *,
        default_recurrent_mode: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, RecurrentStack):
            raise TypeError(f"model: expected an agalite_triton.AGaLiTe or GaLiTe, got {type(model).__name__}")
        if not model.batch_first:
            raise ValueError("model: expected batch_first=True (tensordicts keep time after the batch), got False")
        if not isinstance(state_key, str):
            raise TypeError(f"state_key: expected a str (it is nested under 'next'), got {type(state_key).__name__}")
        self.model = model
        self.state_key = state_key
        self.in_keys = [in_key, state_key, "is_init"]
        self.out_keys = [out_key, ("next", state_key)]
        self._recurrent_mode = default_recurrent_mode

    # The same mode logic as LSTMModule: a set_recurrent_mode context wins over the default.
    @property
    def recurrent_mode(self) -> bool:
        mode = _recurrent_mode()
        return bool(self._recurrent_mode) if mode is None else bool(mode)

    @recurrent_mode.setter
    def recurrent_mode(self, value: bool) -> None:
        raise RuntimeError(
            "recurrent_mode cannot be changed in-place. Please use the set_recurrent_mode context manager."
        )

    def set_recurrent_mode(self, mode: bool = True) -> None:
        raise RuntimeError(
            "AGaLiTeModule.set_recurrent_mode() does not exist, as LSTMModule's was removed in torchrl 0.8: use "
            "the torchrl.modules.set_recurrent_mode context manager or default_recurrent_mode=."
        )

    def make_tensordict_primer(self) -> TensorDictPrimer:
        """A primer that zero-fills ``state_key`` at reset: the initial state (memory 0, and tick 1 where the
        core has a tick)."""
        spec = Unbounded(shape=(self.model.state_size,), dtype=self.model._state_dtype())
        return TensorDictPrimer({self.state_key: spec}, expand_specs=True)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        in_key, out_key = self.in_keys[0], self.out_keys[0]
        x = tensordict.get(in_key)
        if _is_vmapped(x):
            raise RuntimeError(
                "AGaLiTeModule cannot run under torch.vmap, which TorchRL's GAE applies to its value network "
                "by default (TorchRL's LSTMModule/GRUModule cannot either): build GAE(..., deactivate_vmap=True)."
            )
        is_init = tensordict.get("is_init", None)
        if is_init is None:
            raise KeyError(
                "is_init: AGaLiTeModule needs the 'is_init' entry; append torchrl.envs.InitTracker() to the env"
            )
        packed = tensordict.get(self.state_key, None)
        shape = tensordict.shape
        size = self.model.state_size
        if self.recurrent_mode:
            if len(shape) == 0:
                raise ValueError("tensordict: recurrent mode needs a time dimension (the last one), got a 0-d one")
            steps = shape[-1]
            lead = shape[:-1]
            x = x.reshape(-1, steps, x.shape[-1]).contiguous()
            is_init = is_init.reshape(-1, steps)
            packed = self._packed_or_zeros(packed, x.shape[:2], x)
            packed = packed.reshape(-1, steps, size)
            y = self._replay(x, packed, is_init)
            tensordict.set(out_key, y.reshape(*lead, steps, y.shape[-1]))
            return tensordict
        x = x.reshape(-1, x.shape[-1]).contiguous()
        is_init = is_init.reshape(-1)
        packed = self._packed_or_zeros(packed, x.shape[:1], x).reshape(-1, size)
        # As LSTMModule: at an episode's first frame the stored state is replaced by zeros (the initial state).
        packed = torch.where(is_init.unsqueeze(-1), torch.zeros((), dtype=packed.dtype, device=packed.device), packed)
        y, state = self.model(x, self.model.unpack_state(packed))
        tensordict.set(out_key, y.reshape(*shape, y.shape[-1]))
        tensordict.set(("next", self.state_key), self.model.pack_state(state).reshape(*shape, size))
        return tensordict

    def _packed_or_zeros(self, packed: torch.Tensor | None, lead: torch.Size, x: torch.Tensor) -> torch.Tensor:
        if packed is None:
            return torch.zeros(*lead, self.model.state_size, dtype=self.model._state_dtype(), device=x.device)
        return packed

    def _replay(self, x: torch.Tensor, packed: torch.Tensor, is_init: torch.Tensor) -> torch.Tensor:
        """(B, T) frames in one call: each row from its first stored state, restarting at is_init frames."""
        state = self.model.unpack_state(packed[:, 0])
        restart = is_init.clone()
        restart[:, 0] = False
        if not bool(restart.any()):
            y, _ = self.model(x, state)
            return y
        restart_state = self.model.unpack_state(packed[restart])
        y, _ = self.model(x, state, restart=restart, restart_state=restart_state)
        return y
