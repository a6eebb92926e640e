"""The trainer skeleton (``training.trainer``) on a toy model: the step order, the release on Cancel, the refusals."""

from __future__ import annotations

import pytest
import torch


class Cancelled(Exception):
    pass


def toy(pack, *, in_backward: bool = False, precision: str = "fp32", nan_at: int | None = None):
    from frozentune.training import trainer

    class Toy(trainer.Trainer):
        what = "Toy"

        def __init__(self):
            super().__init__(torch.device("cpu"), precision, steps=4, learning_rate=0.1, seed=0)
            self.layer = torch.nn.Linear(3, 1)
            self.build_optimizer("adamw", list(self.layer.parameters()), in_backward=in_backward)
            self.updates = 0

        def batch_loss(self, step):
            x = torch.randn(2, 3, generator=self.generator)
            loss = self.layer(x).pow(2).mean()
            return loss * float("nan") if step == nan_at else loss

        def after_update(self):
            self.updates += 1

    return Toy()


@pytest.mark.parametrize("in_backward", [False, True])
def test_cancel_in_on_step_releases_the_optimizer_state_and_gradients(pack, in_backward):
    run = toy(pack, in_backward=in_backward)

    def on_step(step, total, loss):
        assert run.optimizer.state, "the state exists while training"
        if step == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        run.fit(on_step)
    assert run.optimizer is None and run.updates == 2
    assert all(p.grad is None for p in run.layer.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in run.layer.parameters()), "StepInBackward's hooks removed"


def test_step_in_backward_makes_the_plain_steps_update(pack):
    plain, fused = toy(pack), toy(pack, in_backward=True)
    fused.layer.load_state_dict(plain.layer.state_dict())
    assert plain.fit() == fused.fit()
    for a, b in zip(plain.layer.parameters(), fused.layer.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_non_finite_loss_stops_before_the_update(pack):
    run = toy(pack, nan_at=1)
    after_one = {}

    def on_step(step, total, loss):
        after_one.update({k: v.clone() for k, v in run.layer.state_dict().items()})

    with pytest.raises(FloatingPointError, match="Toy: the loss became nan at step 2 of 4"):
        run.fit(on_step)
    assert all(torch.equal(v, after_one[k]) for k, v in run.layer.state_dict().items())
    assert run.optimizer is None


def test_trainables_must_be_fp32_and_fp16_compute_keeps_the_loss_scaler(pack):
    from frozentune.training import trainer

    run = trainer.Trainer(torch.device("cpu"), "fp32", steps=1, learning_rate=0.1, seed=0)
    with pytest.raises(ValueError, match="holds torch.float16 weights"):
        run.build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    half = trainer.Trainer(torch.device("cpu"), "fp16", steps=1, learning_rate=0.1, seed=0)
    with pytest.raises(ValueError, match="fp16 loss scaling"):
        half.build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], in_backward=True)
    assert half.scaler.is_enabled()
