"""The optimizers a trainer may pick, built over fp32 master weights, and their state as plain tensors.

``adamw8bit`` is bitsandbytes' blockwise 8-bit AdamW (Dettmers et al., 2022): both moments are kept as
uint8 codes with one fp32 scale per block of 256 values, about 2 bytes of state per parameter instead of
torch AdamW's 8. bitsandbytes was chosen over torchao's ``AdamW8bit`` because it runs natively on the CPU
(torchao's CPU path goes through ``torch.compile``, which needs a C++ compiler at run time and took ~60 s
to compile here), its state is plain uint8/fp32 tensors that safetensors stores as they are (torchao's is a
tensor subclass), and it is the 8-bit optimizer kohya sd-scripts and diffusers' training scripts use.
Like its torch counterpart it keeps parameters smaller than 4096 elements (biases, norms) in fp32 state
(bitsandbytes' ``min_8bit_size``), so the saving is on the large weight matrices.

bitsandbytes is optional: it is imported only when ``adamw8bit`` is asked for, never at pack import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adafactor", "adamw", "adamw8bit")
# Tested with this release (the test venv pins it in tests/harness/setup_runtime.py).
BITSANDBYTES_VERSION = "0.50.2"
# bitsandbytes' default: parameters with fewer elements keep fp32 optimizer state.
MIN_8BIT_SIZE = 4096
# bitsandbytes' state_dict() nests the quantization tensors under this key (to hide them from FSDP).
_BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"


def make(name: str, params: Iterable, learning_rate: float, weight_decay: float = 1e-2) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``."""
    if name == "adamw":
        params = list(params)
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=_fused(params) or None)
    if name == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay,
                                               min_8bit_size=MIN_8BIT_SIZE)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    raise ValueError(f"optimizer {name!r} is unknown: use one of {', '.join(OPTIMIZERS)}.")


def _fused(params: list) -> bool:
    """Whether torch's fused AdamW (one kernel per step instead of a dozen per parameter list: about 5x faster on the
    CPU, no full-size temporaries) runs on these parameters: float tensors on a device this torch has the kernel for
    (CUDA since torch 2.0, the CPU since 2.4); otherwise the default (foreach) one."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    devices = _get_fused_kernels_supported_devices()
    return bool(tensors) and all(torch.is_tensor(p) and p.is_floating_point() and p.device.type in devices
                                 for p in tensors)


def _bitsandbytes():
    """bitsandbytes, or an error that says how to install it (the pack never runs pip itself)."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "optimizer 'adamw8bit' needs the bitsandbytes package, which is not installed in this Python: "
            f"run `python -m pip install bitsandbytes=={BITSANDBYTES_VERSION}` with the Python that runs "
            "ComfyUI, or pick optimizer 'adamw'."
        ) from err
    return bitsandbytes


def state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """The optimizer's state as flat plain tensors (for a safetensors file) and a JSON string for the rest.

    Works for every optimizer in ``OPTIMIZERS``. Tensor keys are ``optim.<param index>.<name>``; the JSON
    holds the param groups and which entries were Python numbers (bitsandbytes and Adafactor keep ``step``
    as an int), so :func:`load_state_tensors` restores them exactly. Tensors the optimizer shares between
    parameters (bitsandbytes' quantization maps) are copied, as safetensors refuses shared storage.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: list[str] = []
    seen: set[int] = set()
    for pid, state in sd["state"].items():
        flat = dict(state)
        flat.update(flat.pop(_BNB_NESTED_KEY, {}))
        for name, value in flat.items():
            key = f"{pid}.{name}"
            if not torch.is_tensor(value):
                numbers.append(key)
                value = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else None)
            elif value.numel() and value.untyped_storage().data_ptr() in seen:
                value = value.clone()
            if value.numel():
                seen.add(value.untyped_storage().data_ptr())
            tensors[f"optim.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, json.dumps({"param_groups": groups, "numbers": numbers})


def load_state_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: str) -> None:
    """Restore a state written by :func:`state_tensors` into ``optimizer`` (same optimizer kind and params)."""
    data = json.loads(info)
    numbers = set(data["numbers"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        pid, name = key[len("optim."):].split(".", 1)
        state.setdefault(int(pid), {})[name] = value.item() if f"{pid}.{name}" in numbers else value
    groups = data["param_groups"]
    for g, current in zip(groups, optimizer.param_groups, strict=False):  # a count mismatch: torch says so below
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        for how in ("fused", "foreach"):  # how this torch runs the step, not state: a checkpoint never sets it
            if how in current:
                g[how] = current[how]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors, each storage counted once (what the memory policy saves)."""
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                s = value.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


class StepInBackward:
    """Each parameter's optimizer step runs as soon as its gradient is ready, and the gradient is freed.

    Why: a whole-UNet fine-tune otherwise holds every fp32 gradient at once until the step (as large as
    the trained weights: 3.2 GiB for SD1.5). AdamW, Adafactor and 8-bit AdamW update each parameter from
    its own gradient and state only, so one optimizer per parameter, stepped from a post-accumulate-grad
    hook, makes the same update (kohya sd-scripts' "fused backward pass"). Not for fp16 loss scaling
    (all gradients must be checked for inf before any step) nor gradient clipping (needs the global norm).
    ``state`` and ``param_groups`` read like one optimizer's; ``step()`` is a no-op (backward did it).
    """

    def __init__(self, name: str, params: Iterable, learning_rate: float, weight_decay: float = 1e-2):
        self.optimizers = {}
        self._hooks = []
        for p in params:
            self.optimizers[p] = make(name, [p], learning_rate, weight_decay)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._step))

    def _step(self, param: torch.Tensor) -> None:
        opt = self.optimizers[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        """Nothing to do: every parameter stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the hooks (the parameters outlive this object in tests and benches)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
