"""The shared optimizers: 8-bit AdamW really holds 8-bit state, trains like AdamW, and resumes exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness.comfy_env import REPO_ROOT, import_pack

import_pack()  # the pack as package `frozentune`; training/ needs no ComfyUI
from frozentune.storage import safetensors_file as files  # noqa: E402
from frozentune.training import optimizers  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: on a busy 2-core machine two threads spin and run 20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def regression_net() -> torch.nn.Module:
    """Two 16384-element matrices (8-bit state) and two biases (< 4096 elements: fp32 state)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    return x, torch.tanh(x @ (torch.randn(64, 64, generator=g) / 8))


def train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> float:
    x, y = regression_data()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(net(x), y).item()


def test_adamw8bit_state_is_a_quarter_of_adamw_state():
    # Only matrices >= MIN_8BIT_SIZE, so the ratio is the 8-bit one (smaller tensors keep fp32 state).
    sizes = {}
    for name in ("adamw", "adamw8bit"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 256, bias=False))
        opt = optimizers.make(name, net.parameters(), 1e-3)
        net(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        sizes[name] = optimizers.state_bytes(opt)
    n_params = 2 * 256 * 256
    # torch AdamW: two fp32 moments = 8 bytes/param; 8-bit: two uint8 moments + fp32 scale per 256 values.
    assert sizes["adamw"] / n_params == pytest.approx(8.0, rel=1e-3)
    assert 2.0 <= sizes["adamw8bit"] / n_params <= 2.1, sizes
    assert sizes["adamw8bit"] / sizes["adamw"] <= 0.3


def test_adamw8bit_keeps_small_tensors_in_fp32_state_and_params_in_fp32():
    net = regression_net()
    opt = optimizers.make("adamw8bit", net.parameters(), 1e-3)
    train(net, opt, 1)
    for p in net.parameters():
        assert p.dtype == torch.float32
        moment = opt.state[p]["state1"]
        assert moment.dtype == (torch.uint8 if p.numel() >= optimizers.MIN_8BIT_SIZE else torch.float32), p.shape


def test_adamw8bit_minimises_a_regression_like_adamw():
    start = train(regression_net(), torch.optim.SGD(regression_net().parameters(), lr=0.0), 0)
    final = {}
    for name in ("adamw", "adamw8bit"):
        net = regression_net()
        final[name] = train(net, optimizers.make(name, net.parameters(), 1e-3), 300)
        assert all(p.dtype == torch.float32 for p in net.parameters())
    # Tolerance: the 8-bit run ends within 10% of torch AdamW's loss, and both cut the loss tenfold.
    assert final["adamw8bit"] <= 1.1 * final["adamw"], final
    assert max(final.values()) < 0.1 * start, (start, final)


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_state_survives_a_safetensors_file_and_resumes_exactly(name, tmp_path):
    net = regression_net()
    opt = optimizers.make(name, net.parameters(), 1e-3)
    train(net, opt, 3)
    tensors, info = optimizers.state_tensors(opt)
    assert all(type(t) is torch.Tensor for t in tensors.values())
    files.save(tmp_path / "state.safetensors", tensors, {"optimizer": info}, format="test")

    resumed = regression_net()
    resumed.load_state_dict(net.state_dict())
    opt2 = optimizers.make(name, resumed.parameters(), 1e-3)
    loaded, meta = files.load(tmp_path / "state.safetensors")
    optimizers.load_state_tensors(opt2, loaded, meta["optimizer"])

    train(net, opt, 3)
    train(resumed, opt2, 3)
    for a, b in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # Without the loaded state the continuation differs, so the check above can fail.
    fresh = regression_net()
    fresh.load_state_dict(resumed.state_dict())
    train(fresh, optimizers.make(name, fresh.parameters(), 1e-3), 1)
    train(resumed, opt2, 1)
    assert not torch.equal(fresh[0].weight, resumed[0].weight)


def test_missing_bitsandbytes_names_the_package_and_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"bitsandbytes.*pip install bitsandbytes=="):
        optimizers.make("adamw8bit", regression_net().parameters(), 1e-3)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'sgd' is unknown.*adamw8bit"):
        optimizers.make("sgd", regression_net().parameters(), 1e-3)


def test_importing_the_optimizers_does_not_import_bitsandbytes():
    code = ("import sys; sys.path.insert(0, 'tests'); from harness.comfy_env import import_pack; import_pack(); "
            "from frozentune.training import optimizers; assert 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_the_test_venv_pins_the_bitsandbytes_release_the_error_names():
    from harness import setup_runtime

    assert f"bitsandbytes=={optimizers.BITSANDBYTES_VERSION}" in setup_runtime.OPTIONAL_REQUIREMENTS


def test_adamw_runs_torchs_fused_step_where_this_torch_has_it_with_adamws_update():
    """The fused AdamW kernel (one launch per step; ~5x faster than the default on this CPU) where torch has it for
    the parameters' device, the same update as the default AdamW up to float rounding."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    net, ref = regression_net(), regression_net()
    opt = optimizers.make("adamw", net.parameters(), 1e-3)
    assert opt.param_groups[0]["fused"] is ("cpu" in _get_fused_kernels_supported_devices() or None)
    train(net, opt, 5)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True), 5)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not optimizers._fused([torch.zeros(3, dtype=torch.int64)])  # not a float: the default step
    assert not optimizers._fused([])


def test_a_checkpoint_never_sets_how_the_step_runs(tmp_path):
    """A state saved by a torch without the fused kernel (``fused`` None) loads into a fused optimizer, and the
    reverse, keeping the loading optimizer's own setting (a state from another machine must not pick the kernel)."""
    net = regression_net()
    plain = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    train(net, plain, 2)
    tensors, info = optimizers.state_tensors(plain)
    opt = optimizers.make("adamw", regression_net().parameters(), 1e-3)
    optimizers.load_state_tensors(opt, tensors, info)
    assert opt.param_groups[0]["fused"] == (optimizers._fused(list(net.parameters())) or None)
    assert opt.state_dict()["state"][0]["exp_avg"].equal(plain.state_dict()["state"][0]["exp_avg"])
