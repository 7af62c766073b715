import pytest
import torch

from ddp_kit.amp import autocast_dtype
from ddp_kit.config import AmpConfig

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A faked GPU whose compute capability the test sets."""
    def fake(capability, name):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return fake


@pytest.mark.parametrize("capability, name", [((7, 0), "Tesla V100-SXM2-32GB"), ((7, 5), "Tesla T4")])
def test_bf16_without_bf16_units_is_warned_about(gpu, capability, name):
    gpu(capability, name)
    dtype, warning = autocast_dtype(AmpConfig(enabled=True, dtype="bf16"), CUDA)
    assert dtype == torch.bfloat16  # the configured dtype stays; the log says what to change
    assert f"amp.dtype=bf16 on {name} (compute capability {capability[0]}.{capability[1]})" in warning
    assert "emulated" in warning and "amp.dtype=fp16" in warning


@pytest.mark.parametrize("cfg, device, capability", [
    (AmpConfig(enabled=True, dtype="bf16"), CUDA, (8, 0)),  # A100: bf16 units
    (AmpConfig(enabled=True, dtype="bf16"), CUDA, (9, 0)),  # H100
    (AmpConfig(enabled=True, dtype="fp16"), CUDA, (7, 0)),  # fp16 on a V100 is what it is good at
    (AmpConfig(enabled=False, dtype="bf16"), CUDA, (7, 0)),  # no autocast at all
    (AmpConfig(enabled=True, dtype="bf16"), torch.device("cpu"), (7, 0)),
])
def test_no_warning_where_the_dtype_runs_natively(gpu, cfg, device, capability):
    gpu(capability, "some GPU")
    dtype, warning = autocast_dtype(cfg, device)
    assert warning is None
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
