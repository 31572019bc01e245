"""Random draws from an explicit generator must name their device.

Lightning builds the model (``configure_model``) under a ``torch.device(<accelerator>)`` context, so on a GPU a factory
call such as ``torch.rand(shape, generator=cpu_generator)`` lands on CUDA and fails ("Expected a 'cuda' device type
for generator but found 'cpu'"): every method failed at start-up on an H100 before the sd3 LoRA init named its
device. CPU-only CI cannot reproduce that error, so this test catches its cause instead: it runs real fits under a
torch-function mode that rejects any random factory call given a ``generator=`` but no ``device=``.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fewstep_rl.testing.contract import run_fit

FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like}


class GeneratorDrawsNameTheirDevice(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("generator") is not None:
            self.draws += 1
            if "device" not in kwargs:
                raise AssertionError(f"torch.{func.__name__} draws from a generator without naming its device")
        return func(*args, **kwargs)


def test_the_mode_flags_a_draw_without_device():
    g = torch.Generator().manual_seed(0)
    with GeneratorDrawsNameTheirDevice(), pytest.raises(AssertionError, match="without naming its device"):
        torch.rand(3, generator=g)
    with GeneratorDrawsNameTheirDevice() as mode:
        torch.rand(3, generator=g, device="cpu")
    assert mode.draws == 1


@pytest.mark.parametrize(
    "method, overrides",
    [
        # sd3 LoRA roles (adapter init), the prompt stream, stage 1 and stage 2 with group-shared noise
        ("rtdmd", {"method.stage1_iterations": 1, "method.batch_size": 2, "method.group_size": 2,
                   "method.micro_batches": 1, "method.fake_updates_per_gen": 1, "method.stage2_epochs_per_batch": 2,
                   "trainer.eval_samples": 8}),
        ("dmd2", {"method.batch_size": 2, "trainer.eval_samples": 8}),
    ],
)
def test_a_shapes_fit_draws_every_generator_sample_on_a_named_device(tmp_path, method, overrides):
    with GeneratorDrawsNameTheirDevice() as mode:
        _, _, logged = run_fit(method, tmp_path, steps=2, world="shapes",
                                    overrides={"trainer.eval_every": 1, **overrides})
    assert logged["_all_finite"] == 1.0
    assert mode.draws > 0  # the mode saw the run's generator draws
