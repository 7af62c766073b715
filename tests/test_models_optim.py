import math

import pytest
import torch
from torch import nn

from ddp_kit.config import ConfigError, ModelConfig, OptimConfig, ScheduleConfig
from ddp_kit.models import build_model
from ddp_kit.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_small_cnn_and_mlp_shapes():
    x = torch.zeros(2, 1, 32, 32)
    assert build_model(ModelConfig(name="small_cnn", num_classes=10, in_channels=1))(x).shape == (2, 10)
    mlp = build_model(ModelConfig(name="mlp", num_classes=7, in_channels=1), example_input_shape=(1, 32, 32))
    assert mlp(x).shape == (2, 7)
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in mlp.modules())


def test_torchvision_model_with_one_input_channel():
    model = build_model(ModelConfig(name="resnet18", num_classes=5, in_channels=1))
    assert model.conv1.in_channels == 1
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="model.name='resnet_18' is unknown: did you mean .*resnet18"):
        build_model(ModelConfig(name="resnet_18"))


USER_MODELS = """
import torch
from torch import nn

class TwoHeads(nn.Module):
    def __init__(self, width, outputs=2):
        super().__init__()
        self.body = nn.Linear(4, width)
        self.heads = nn.ModuleDict({"a": nn.Linear(width, outputs), "b": nn.Linear(width, 1)})

    def forward(self, x):
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}

def not_a_module():
    return 3
"""


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "user_nets.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelConfig(name="user_nets:TwoHeads", kwargs={"width": 8, "outputs": 3}))
    out = model(torch.zeros(5, 4))
    assert out["a"].shape == (5, 3) and out["b"].shape == (5, 1)
    cases = [("user_nets:TwoHead", {"width": 8}, "user_nets has no attribute 'TwoHead'; did you mean 'TwoHeads'?"),
             ("no_such_pkg.nets:Net", {}, "no module named 'no_such_pkg'"),
             ("user_nets:TwoHeads", {"wdth": 8}, "model.kwargs={'wdth': 8} does not fit user_nets:TwoHeads"),
             ("user_nets:TwoHeads", {}, "missing a required argument: 'width'"),
             ("user_nets:", {}, "an import path is written 'package.module:attribute'"),
             ("small_cnn", {"depth": 3}, "model.kwargs={'in_channels': 1, 'num_classes': 10, 'depth': 3} does not "
                                         "fit small_cnn"),
             ("user_nets:not_a_module", {}, "returned a int, not a torch.nn.Module")]
    for name, kwargs, fragment in cases:
        with pytest.raises(ConfigError) as error:
            build_model(ModelConfig(name=name, kwargs=kwargs))
        assert fragment in str(error.value), (name, str(error.value))
    assert build_model(ModelConfig(name="small_cnn", kwargs={"width": 4})).head.in_features == 16


def test_no_weight_decay_on_biases_and_norms():
    model = build_model(ModelConfig(name="small_cnn"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    bn_and_bias = sum(p.numel() for m in model.modules() for n, p in m.named_parameters(recurse=False)
                      if isinstance(m, nn.BatchNorm2d) or n == "bias")
    assert sum(p.numel() for p in no_decay["params"]) == bn_and_bias
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total


def test_optimizers():
    model = nn.Linear(3, 2)
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=0.3, momentum=0.9, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.3
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, betas=[0.8, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.99)


def test_warmup_then_cosine_to_min_lr():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1, min_lr=0.01)
    factors = [lr_factor(s, cfg, 0.1, steps_per_epoch=10, total_steps=50) for s in range(51)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[10] == pytest.approx(1.0)
    assert factors[30] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[50] == pytest.approx(0.1)  # min_lr / lr
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_step_and_constant_schedules():
    step = ScheduleConfig(name="step", step_epochs=2, gamma=0.5)
    assert [lr_factor(s, step, 1.0, 3, 30) for s in (0, 5, 6, 12)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(17, ScheduleConfig(name="constant"), 1.0, 3, 30) == 1.0


def test_scheduler_drives_optimizer_lr():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(lr=0.2))
    sched = build_scheduler(opt, ScheduleConfig(name="cosine"), 0.2, steps_per_epoch=4, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[4] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))
