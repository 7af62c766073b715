"""A user's own code as the tests import it by path (model.name, objective.name: 'user_code:...'): models the
built-ins are not (a dict output, several heads, an unused parameter) and a metric ddp_kit does not know."""

import torch
import torch.nn.functional as F
from torch import nn

from ddp_kit.objectives import objective_from_functions


class TwoHeads(nn.Module):
    """Flatten -> hidden -> {"logits": classes, "energy": 1}; no normalization layers."""

    def __init__(self, pixels: int, classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), nn.Tanh())
        self.logits, self.energy = nn.Linear(width, classes), nn.Linear(width, 1)

    def forward(self, image):
        hidden = self.body(image)
        return {"logits": self.logits(hidden), "energy": self.energy(hidden)}


class WithUnusedHead(TwoHeads):
    """TwoHeads plus a head the loss never reaches."""

    def __init__(self, pixels: int, classes: int, width: int = 32):
        super().__init__(pixels, classes, width)
        self.unused = nn.Linear(width, 3)


def margin_loss(output, batch):
    return F.multi_margin_loss(output["logits"], batch["label"]) + 1e-3 * output["energy"].square().mean()


def margin_sums(output, batch):
    logits, label = output["logits"].double(), batch["label"]
    true = logits.gather(1, label[:, None])[:, 0]
    runner_up = logits.scatter(1, label[:, None], float("-inf")).amax(1)
    return {"margin": (true - runner_up).sum(), "hits": (true > runner_up).sum(),
            "count": torch.tensor(len(label), device=label.device)}


# the hit rate as a metric of its own name, kept as the best checkpoint's
margin = objective_from_functions(margin_loss, margin_sums)
margin.best = ("hits", "max")


def non_scalar_loss(output, batch):
    return F.cross_entropy(output["logits"], batch["label"], reduction="none")


non_scalar = objective_from_functions(non_scalar_loss, margin_sums)


class RegressionNet(nn.Module):
    """features (N x F) -> prediction (N x outputs), optionally with BatchNorm1d after the hidden layer."""

    def __init__(self, features: int, outputs: int, width: int = 32, batch_norm: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, width), *([nn.BatchNorm1d(width)] if batch_norm else []),
                                 nn.Tanh(), nn.Linear(width, outputs))

    def forward(self, features):
        return self.net(features)
