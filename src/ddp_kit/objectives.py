"""Objectives: the one place that knows the task (the loss, and the metrics validation reports).

An objective is any object with three methods (duck typing, no base class):

    loss(output, batch) -> scalar tensor         the training loss, a mean over the batch
    evaluate(output, batch) -> {name: tensor}    validation SUMS over the batch (float64 or int64, fixed shapes)
    summarize(sums) -> {name: float}             the metrics, from the sums over every batch of every rank

`output` is whatever the model returns (a tensor, a tuple or a dict); `batch` is the dict of fields the data
yields. The loop adds each batch's sums, all-reduces them (SUM) across ranks and calls summarize once, so the
metrics equal a single process's whatever the number of ranks or how unevenly the data splits: sums add up
exactly, means of means do not. Metric names are used as they are by the log, metrics.jsonl (val_<name>),
TensorBoard (val/<name>) and checkpoint.best_metric (val_<name>). Two optional members:

    counts(batch) -> {unit: int}     throughput units of one training batch (default {"samples": batch size})
    best = (metric, "max" | "min")   what the best checkpoint is kept by (default ("loss", "min"))

A user's own objective, e.g. denoising scored by PSNR::

    import torch
    import torch.nn.functional as F
    import ddp_kit
    from ddp_kit.objectives import mean_per_count, objective_from_functions

    class Denoising:
        best = ("psnr", "max")

        def loss(self, output, batch):
            return F.mse_loss(output, batch["clean"])

        def evaluate(self, output, batch):
            mse = ((output.double() - batch["clean"].double()) ** 2).flatten(1).mean(1)  # one per image
            return {"mse": mse.sum(), "psnr": (-10 * mse.log10()).sum(),
                    "count": torch.tensor(len(mse), device=mse.device)}

        def summarize(self, sums):
            return mean_per_count(sums)  # {"mse": ..., "psnr": ...} per image

    ddp_kit.train(cfg, model=UNet(), objective=Denoising())

or a pair of functions; summarize then defaults to mean_per_count, so name each sum after the metric it is
the sum of::

    def loss(output, batch):
        return F.binary_cross_entropy_with_logits(output, batch["label"].float())

    def evaluate(output, batch):
        label = batch["label"].double()
        return {"loss": F.binary_cross_entropy_with_logits(output.double(), label, reduction="sum"),
                "acc": ((output > 0) == label.bool()).sum(), "count": torch.tensor(len(label), device=label.device)}

    ddp_kit.train(cfg, model=net, objective=objective_from_functions(loss, evaluate))

Built-ins, by name in a config (objective.name / objective.kwargs) or as classes: classification,
regression, segmentation, language_model; objective.name may also be an import path 'package.module:attribute'
naming an objective, or a class or function returning one (called with objective.kwargs).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from . import distributed
from .config import ConfigError, did_you_mean
from .plugins import check_call, import_object, is_import_path

DEFAULT_BEST = ("loss", "min")


class ObjectiveError(ValueError):
    """The model's output or the batch does not hold what the objective needs; the message says what it got."""


@runtime_checkable
class Objective(Protocol):
    def loss(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: a scalar tensor (mean over the batch), from the model's output and the batch."""

    def evaluate(self, output: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validation sums over this batch: tensors of fixed shapes, float64 or int64."""

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics from the sums over the whole validation set."""


REQUIRED_METHODS = ("loss", "evaluate", "summarize")


def _missing_methods(obj: Any) -> list[str]:
    return [name for name in REQUIRED_METHODS if not callable(getattr(obj, name, None))]


def check_objective(obj: Any) -> Any:
    """`obj`, once it is known to have the objective's methods (and a valid `best`, if any)."""
    if isinstance(obj, type):
        raise ObjectiveError(f"the objective is the class {obj.__name__}, not an instance: pass {obj.__name__}()")
    missing = _missing_methods(obj)
    if missing:
        raise ObjectiveError(f"the objective {type(obj).__name__} has no method {', '.join(map(repr, missing))}; an "
                             "objective needs loss(output, batch), evaluate(output, batch) and summarize(sums) "
                             "(or use objective_from_functions(loss, evaluate))")
    if hasattr(obj, "counts") and not callable(obj.counts):
        raise ObjectiveError(f"the objective {type(obj).__name__}.counts is a {type(obj.counts).__name__}; it must "
                             "be a method counts(batch) -> {unit: number}")
    best_metric(obj)
    return obj


def best_metric(objective: Any) -> tuple[str, str]:
    """(metric name, "max" or "min"): what the best checkpoint is kept by."""
    best = getattr(objective, "best", DEFAULT_BEST)
    if not (isinstance(best, (tuple, list)) and len(best) == 2 and isinstance(best[0], str)
            and best[1] in ("max", "min")):
        raise ObjectiveError(f"the objective {type(objective).__name__}.best={best!r}; it must be (metric name, "
                             "'max' or 'min'), e.g. ('acc', 'max')")
    return tuple(best)


def checked_loss(objective: Any, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """objective.loss(output, batch), refused unless it is a floating scalar tensor (backward needs one)."""
    value = objective.loss(output, batch)
    where = (f"the loss function {_function_name(objective._loss)}" if isinstance(objective, FunctionObjective)
             else f"the objective {type(objective).__name__}'s loss")
    if not isinstance(value, torch.Tensor):
        raise ObjectiveError(f"{where} returned a {type(value).__name__}, not a tensor (backward needs the tensor)")
    if value.ndim != 0:
        raise ObjectiveError(f"{where} returned a tensor of shape {tuple(value.shape)}, not a scalar: reduce it "
                             "over the batch (e.g. .mean())")
    if not value.is_floating_point():
        raise ObjectiveError(f"{where} returned a {value.dtype} tensor; it must be floating point")
    return value


def batch_counts(objective: Any, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Throughput units of one training batch: objective.counts(batch), or {"samples": the batch size}."""
    if hasattr(objective, "counts"):
        return objective.counts(batch)
    return {"samples": len(next(iter(batch.values())))}


def add_sums(totals: Optional[dict[str, torch.Tensor]], sums: Any) -> dict[str, torch.Tensor]:
    """`totals` plus one batch's evaluate() result, key by key (a copy of `sums` when `totals` is None).
    Refuses sums that could not add up exactly or that change keys or shapes between batches."""
    if not isinstance(sums, Mapping) or not all(isinstance(v, torch.Tensor) for v in sums.values()):
        raise ObjectiveError(f"evaluate returned {_describe(sums)}; it must return a dict of tensors "
                             "{name: sum over the batch}")
    for key, value in sums.items():
        if value.dtype not in (torch.float64, torch.int64):
            # float32 sums drift with the batch split; narrow integers overflow (2**31 pixels is a few thousand
            # images) and bool adds as logical or.
            raise ObjectiveError(f"evaluate's sum {key!r} is {value.dtype}; return float64 or int64 sums (.double(), "
                                 ".long()), so that they add up exactly over batches and ranks")
    if totals is None:
        return {key: value.detach().clone() for key, value in sums.items()}
    if sums.keys() != totals.keys():
        raise ObjectiveError(f"evaluate returned the sums {sorted(sums)} for one batch and {sorted(totals)} for "
                             "an earlier one; it must return the same keys for every batch")
    for key, value in sums.items():
        if value.shape != totals[key].shape:
            raise ObjectiveError(f"evaluate's sum {key!r} has shape {tuple(value.shape)} for one batch and "
                                 f"{tuple(totals[key].shape)} for an earlier one; sums need fixed shapes")
        totals[key] += value.detach()
    return totals


def all_reduce_sums(totals: dict[str, torch.Tensor], rt: distributed.Runtime) -> dict[str, torch.Tensor]:
    """Every rank's totals summed (in place). Keys in sorted order: every rank must issue the same collectives
    in the same order, whatever order its evaluate built the dict in."""
    for key in sorted(totals):
        distributed.all_reduce_sum(totals[key], rt)
    return totals


def mean_per_count(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every sum but "count" divided by "count": {"loss": 12.0, "acc": 7, "count": 10} -> {"loss": 1.2, "acc": 0.7}."""
    if "count" not in sums:
        raise ObjectiveError(f"mean_per_count divides every sum by the sum 'count', and evaluate returned none "
                             f"(sums: {', '.join(sums)}); add 'count' (how many the others are sums over) or pass "
                             "summarize=")
    metrics = {}
    for key, value in sums.items():
        if key == "count":
            continue
        if value.numel() != 1:
            raise ObjectiveError(f"mean_per_count makes one number of each sum, and {key!r} has shape "
                                 f"{tuple(value.shape)}; pass a summarize= that reduces it")
        metrics[key] = value.item() / sums["count"].item()
    return metrics


class FunctionObjective:
    """An objective made of plain functions: see objective_from_functions."""

    def __init__(self, loss: Callable, evaluate: Callable, summarize: Callable):
        self._loss, self._evaluate, self._summarize = loss, evaluate, summarize

    def loss(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(output, batch)

    def evaluate(self, output: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._evaluate(output, batch)

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        return self._summarize(sums)


def objective_from_functions(loss: Callable, evaluate: Callable,
                             summarize: Optional[Callable] = None) -> FunctionObjective:
    """An objective from loss(output, batch), evaluate(output, batch) and summarize(sums) (default:
    mean_per_count, every sum divided by the sum "count")."""
    for role, function in (("loss", loss), ("evaluate", evaluate), ("summarize", summarize)):
        if not callable(function) and (role != "summarize" or function is not None):
            raise ObjectiveError(f"objective_from_functions: {role} is a {type(function).__name__}, not a function")
    return FunctionObjective(loss, evaluate, summarize or mean_per_count)


def _function_name(function: Callable) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


# ---------------------------------------------------------------------------------------------------------
# Built-ins. Each takes the model's output tensor (or output[output_key]) and named batch fields, computes in
# at least float32 (half-precision outputs are upcast, float64 ones kept) and sums in float64.


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} (keys: {', '.join(map(str, value))})"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _select_output(output: Any, key: Any, objective: str, role: str) -> torch.Tensor:
    """The tensor of the model's output the objective scores: the output itself, or output[key]."""
    if key is None:
        if isinstance(output, torch.Tensor):
            return output
        raise ObjectiveError(f"objective {objective}: the model returned {_describe(output)}, not a tensor; set "
                             f"objective.kwargs.output_key to the key or index of the {role}")
    if isinstance(output, Mapping):
        if key not in output:
            raise ObjectiveError(f"objective {objective}: the model's output is a {type(output).__name__} without "
                                 f"{key!r} (keys: {', '.join(map(str, output))}); set objective.kwargs.output_key")
        value = output[key]
    elif isinstance(output, (tuple, list)):
        if not isinstance(key, int) or not -len(output) <= key < len(output):
            raise ObjectiveError(f"objective {objective}: the model's output is a {type(output).__name__} of "
                                 f"{len(output)}; output_key={key!r} is not an index into it (set "
                                 "objective.kwargs.output_key)")
        value = output[key]
    else:
        raise ObjectiveError(f"objective {objective}: output_key={key!r} needs a dict or tuple output, and the model "
                             f"returned {_describe(output)} (unset objective.kwargs.output_key)")
    if not isinstance(value, torch.Tensor):
        raise ObjectiveError(f"objective {objective}: the model's output[{key!r}] is {_describe(value)}, not a tensor")
    return value


def _field(batch: Mapping[str, torch.Tensor], name: str, objective: str, setting: str = "target") -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise ObjectiveError(f"objective {objective}: the batch is {_describe(batch)}, not a dict of fields")
    if name not in batch:
        raise ObjectiveError(f"objective {objective}: the batch has no field {name!r} (fields: "
                             f"{', '.join(map(str, batch))}); set objective.kwargs.{setting}")
    return batch[name]


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    # Losses in float16/bfloat16 lose small probabilities and long sums; float64 input stays float64.
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _class_indices(target: torch.Tensor, objective: str, name: str) -> torch.Tensor:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ObjectiveError(f"objective {objective}: the batch field {name!r} is {target.dtype}; it must hold "
                             "integer class indices")
    return target.long()


def _shape(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape)


def _check_target_shape(objective: str, name: str, target: torch.Tensor, expected: tuple, logits: torch.Tensor,
                        note: str) -> None:
    if _shape(target) != expected:
        raise ObjectiveError(f"objective {objective}: the batch field {name!r} has shape {_shape(target)}; for logits "
                             f"of shape {_shape(logits)} it must be {expected}{note}")


class Classification:
    """Cross-entropy of N x C logits against N integer labels (torch's, with label_smoothing and ignore_index).

    Metrics: loss (the mean loss as trained, so with label_smoothing > 0 it is the smoothed loss, higher than the
    plain negative log-likelihood), acc (top-1 accuracy) and acc_top<k> for each other k of top_k. Rows labelled
    ignore_index count in none of them."""

    name = "classification"
    best = ("acc", "max")

    def __init__(self, target: str = "label", output_key: Any = None, label_smoothing: float = 0.0,
                 ignore_index: int = -100, top_k: tuple[int, ...] = (1,), num_classes: Optional[int] = None):
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"objective classification: label_smoothing={label_smoothing!r} must be in [0, 1) "
                              "(objective.kwargs.label_smoothing)")
        if not top_k or not all(isinstance(k, int) and k >= 1 for k in top_k):
            raise ConfigError(f"objective classification: top_k={top_k!r} must be a list of positive integers, e.g. "
                              "[1, 5] (objective.kwargs.top_k)")
        if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ConfigError(f"objective classification: num_classes={num_classes!r} must be a positive integer "
                              "(objective.kwargs.num_classes)")
        self.target, self.output_key, self.ignore_index = target, output_key, ignore_index
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.top_k = sorted(set(top_k) | {1})  # acc (top-1) always: it is what `best` keeps

    def _inputs(self, output: Any, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _upcast(_select_output(output, self.output_key, self.name, "logits"))
        target = _field(batch, self.target, self.name)
        if logits.ndim != 2:
            raise ObjectiveError(f"objective classification: the logits have shape {_shape(logits)}; it needs "
                                 "N x C (per pixel: segmentation; per token: language_model)")
        classes = logits.shape[1]
        if self.num_classes is not None and classes != self.num_classes:
            raise ObjectiveError(f"objective classification: num_classes={self.num_classes} but the logits have "
                                 f"{classes} classes (shape {_shape(logits)})")
        if max(self.top_k) > classes:
            raise ObjectiveError(f"objective classification: top_k={self.top_k} needs at least {max(self.top_k)} "
                                 f"classes; the logits have {classes}")
        _check_target_shape(self.name, self.target, target, (logits.shape[0],), logits, ", one class index per row")
        return logits, _class_indices(target, self.name, self.target)

    def loss(self, output: Any, batch: Mapping) -> torch.Tensor:
        logits, target = self._inputs(output, batch)
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def evaluate(self, output: Any, batch: Mapping) -> dict[str, torch.Tensor]:
        logits, target = self._inputs(output, batch)
        losses = F.cross_entropy(logits, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                 reduction="none")  # 0 on ignored rows
        kept = target != self.ignore_index
        hits = logits.topk(max(self.top_k), dim=1).indices == target[:, None]
        sums = {"loss": losses.double().sum(), "count": kept.sum()}
        for k in self.top_k:
            sums[_accuracy_name(k)] = (hits[:, :k].any(dim=1) & kept).sum()
        return sums

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        count = sums["count"].item()
        return {"loss": sums["loss"].item() / count,
                **{_accuracy_name(k): sums[_accuracy_name(k)].item() / count for k in self.top_k}}


def _accuracy_name(k: int) -> str:
    return "acc" if k == 1 else f"acc_top{k}"


class Regression:
    """Regression of outputs of any shape N x ... against a target field of the same shape (cast to the output's
    dtype), by mse, l1 or huber, each sample weighted by the optional N-vector field `weight`.

    Metrics (weighted by `weight`, averaged uniformly over the outputs, as sklearn's multioutput="uniform_average"):
    loss, mse, mae, r2. R^2 per output comes from summed moments (sum w, w*y, w*y^2, w*(y-yhat)^2), exact across
    ranks; like sklearn's, an output whose target is exactly constant scores 1 if predicted exactly, else 0."""

    name = "regression"
    best = ("r2", "max")
    LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}

    def __init__(self, target: str = "target", output_key: Any = None, weight: Optional[str] = None,
                 loss: str = "mse", huber_delta: float = 1.0):
        if loss not in self.LOSSES:
            raise ConfigError(f"objective regression: loss={loss!r} is unknown: use mse, l1 (mean absolute error) or "
                              "huber (objective.kwargs.loss)")
        if not huber_delta > 0:
            raise ConfigError(f"objective regression: huber_delta={huber_delta!r} must be positive "
                              "(objective.kwargs.huber_delta)")
        self.target, self.output_key, self.weight = target, output_key, weight
        self.criterion, self.huber_delta = loss, huber_delta

    def _inputs(self, output: Any, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        prediction = _upcast(_select_output(output, self.output_key, self.name, "prediction"))
        target = _field(batch, self.target, self.name)
        if not prediction.is_floating_point() or prediction.ndim == 0:
            raise ObjectiveError(f"objective regression: the model's output is a {prediction.dtype} tensor of shape "
                                 f"{_shape(prediction)}; it needs floating point N x ...")
        if _shape(target) != _shape(prediction):
            raise ObjectiveError(f"objective regression: the model's output has shape {_shape(prediction)} but the "
                                 f"batch field {self.target!r} has shape {_shape(target)}; they must be equal (torch "
                                 "would broadcast them, e.g. an (N,) target against an (N, 1) output to N x N): "
                                 "reshape the target or the model's output")
        weight = None
        if self.weight is not None:
            weight = _field(batch, self.weight, self.name, setting="weight")
            if _shape(weight) != (len(prediction),):
                raise ObjectiveError(f"objective regression: the weight field {self.weight!r} has shape "
                                     f"{_shape(weight)}; it must be ({len(prediction)},), one weight per sample")
            weight = weight.to(prediction.dtype)
        return prediction, target.to(prediction.dtype), weight

    def _elementwise(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        extra = {"delta": self.huber_delta} if self.criterion == "huber" else {}
        return self.LOSSES[self.criterion](prediction, target, reduction="none", **extra)

    def loss(self, output: Any, batch: Mapping) -> torch.Tensor:
        prediction, target, weight = self._inputs(output, batch)
        elementwise = self._elementwise(prediction, target)
        if weight is None:
            return elementwise.mean()
        return (weight * elementwise.reshape(len(weight), -1).mean(dim=1)).sum() / weight.sum()

    def evaluate(self, output: Any, batch: Mapping) -> dict[str, torch.Tensor]:
        prediction, target, weight = self._inputs(output, batch)
        n = len(prediction)
        prediction, target = prediction.double().reshape(n, -1), target.double().reshape(n, -1)
        weight = torch.ones(n, dtype=torch.float64, device=target.device) if weight is None else weight.double()
        error = target - prediction
        per_sample = weight[:, None]
        return {"weight": weight.sum(),
                "loss": (weight * self._elementwise(prediction, target).mean(dim=1)).sum(),
                "abs_error": (per_sample * error.abs()).sum(),
                "squared_error": (per_sample * error ** 2).sum(dim=0),
                "target": (per_sample * target).sum(dim=0),
                "target_squared": (per_sample * target ** 2).sum(dim=0)}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        weight, squared_error = sums["weight"], sums["squared_error"]
        outputs = squared_error.numel()
        spread = sums["target_squared"] - sums["target"] ** 2 / weight  # sum w (y - mean y)^2, per output
        r2 = torch.where(spread == 0, (squared_error == 0).double(), 1 - squared_error / spread)
        return {"loss": (sums["loss"] / weight).item(), "mse": (squared_error.sum() / (weight * outputs)).item(),
                "mae": (sums["abs_error"] / (weight * outputs)).item(), "r2": r2.mean().item()}


class Segmentation:
    """Per-pixel cross-entropy of N x C x H x W logits (any number of spatial dimensions) against an integer mask
    N x H x W or N x 1 x H x W; pixels labelled ignore_index count nowhere.

    Metrics: loss (mean per pixel), pixel_acc, miou: the mean IoU over the classes present in the target or the
    prediction (a class absent from both has no IoU and is left out), from a C x C confusion matrix summed over
    ranks. Mask values outside [0, num_classes) are refused by evaluate; in training, torch's cross-entropy refuses
    them (on CUDA as a device-side assert)."""

    name = "segmentation"
    best = ("miou", "max")

    def __init__(self, num_classes: int, target: str = "mask", output_key: Any = None, ignore_index: int = 255):
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ConfigError(f"objective segmentation: num_classes={num_classes!r} must be a positive integer "
                              "(objective.kwargs.num_classes)")
        self.num_classes, self.target, self.output_key = num_classes, target, output_key
        self.ignore_index = ignore_index

    def _inputs(self, output: Any, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _upcast(_select_output(output, self.output_key, self.name, "logits"))
        mask = _field(batch, self.target, self.name)
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ObjectiveError(f"objective segmentation: the logits have shape {_shape(logits)}; they must be "
                                 f"N x C x H x W with C = num_classes = {self.num_classes}")
        if mask.ndim == logits.ndim and mask.shape[1] == 1:
            mask = mask.squeeze(1)
        _check_target_shape(self.name, self.target, mask, (logits.shape[0], *logits.shape[2:]), logits,
                            " (or with a channel of 1)")
        return logits, _class_indices(mask, self.name, self.target)

    def loss(self, output: Any, batch: Mapping) -> torch.Tensor:
        logits, mask = self._inputs(output, batch)
        return F.cross_entropy(logits, mask, ignore_index=self.ignore_index)

    def evaluate(self, output: Any, batch: Mapping) -> dict[str, torch.Tensor]:
        logits, mask = self._inputs(output, batch)
        kept = mask != self.ignore_index
        target, prediction = mask[kept], logits.argmax(dim=1)[kept]
        outside = (target < 0) | (target >= self.num_classes)
        if outside.any():
            raise ObjectiveError(f"objective segmentation: the batch field {self.target!r} holds "
                                 f"{target[outside].unique()[:10].tolist()}, outside the classes "
                                 f"0..{self.num_classes - 1} and not ignore_index={self.ignore_index}")
        losses = F.cross_entropy(logits, mask, ignore_index=self.ignore_index, reduction="none")
        classes = self.num_classes
        confusion = torch.bincount(target * classes + prediction, minlength=classes * classes)
        return {"loss": losses.double().sum(), "count": kept.sum(), "confusion": confusion.reshape(classes, classes)}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        confusion = sums["confusion"]  # rows: target class, columns: predicted class
        hits = confusion.diag()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - hits
        present = union > 0
        count = sums["count"].item()
        return {"loss": sums["loss"].item() / count, "pixel_acc": hits.sum().item() / count,
                "miou": (hits[present].double() / union[present]).mean().item()}


class LanguageModel:
    """Next-token cross-entropy of N x L x V logits against an N x L target, already shifted by the data:
    target[:, t] is the token that follows position t (positions labelled ignore_index, e.g. padding, count
    nowhere). Metrics: loss (mean per token), perplexity = exp(loss). Throughput in samples and tokens."""

    name = "language_model"
    best = ("loss", "min")

    def __init__(self, target: str = "target", output_key: Any = None, ignore_index: int = -100):
        self.target, self.output_key, self.ignore_index = target, output_key, ignore_index

    def _inputs(self, output: Any, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _upcast(_select_output(output, self.output_key, self.name, "logits"))
        target = self._tokens(batch)
        if logits.ndim != 3 or logits.shape[:2] != target.shape:
            raise ObjectiveError(f"objective language_model: the logits have shape {_shape(logits)} and the batch "
                                 f"field {self.target!r} {_shape(target)}; they must be N x L x V and N x L")
        return logits.flatten(0, 1), target.flatten()

    def _tokens(self, batch: Mapping) -> torch.Tensor:
        target = _field(batch, self.target, self.name)
        if target.ndim != 2:
            raise ObjectiveError(f"objective language_model: the batch field {self.target!r} has shape "
                                 f"{_shape(target)}; it must be N x L token ids")
        return _class_indices(target, self.name, self.target)

    def loss(self, output: Any, batch: Mapping) -> torch.Tensor:
        logits, target = self._inputs(output, batch)
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)

    def evaluate(self, output: Any, batch: Mapping) -> dict[str, torch.Tensor]:
        logits, target = self._inputs(output, batch)
        losses = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        return {"loss": losses.double().sum(), "count": (target != self.ignore_index).sum()}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        loss = sums["loss"] / sums["count"]
        return {"loss": loss.item(), "perplexity": loss.exp().item()}  # a tensor's exp overflows to inf, math's raises

    def counts(self, batch: Mapping) -> dict[str, int]:
        n, length = self._tokens(batch).shape
        return {"samples": n, "tokens": n * length}


BUILTIN_OBJECTIVES = {"classification": Classification, "regression": Regression, "segmentation": Segmentation,
                      "language_model": LanguageModel}


def build_objective(name: str, kwargs: dict) -> Any:
    """The objective `name` names: a built-in (BUILTIN_OBJECTIVES) or an import path 'package.module:attribute'
    to an objective (used as is; kwargs must then be empty) or to a class or function returning one (called with
    **kwargs). ConfigError names objective.name or objective.kwargs for whatever does not fit."""
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"objective.kwargs={kwargs!r} must be a mapping of argument names to values")
    if is_import_path(name):
        found = import_object(name, "objective.name")
        if not isinstance(found, type) and not _missing_methods(found):
            if kwargs:
                raise ConfigError(f"objective.name={name!r} is an objective already, so objective.kwargs={kwargs!r} "
                                  "has nothing to go to; remove objective.kwargs, or name a class or function")
            return check_objective(found)
        factory = found
    elif name in BUILTIN_OBJECTIVES:
        factory = BUILTIN_OBJECTIVES[name]
    else:
        raise ConfigError(f"objective.name={name!r} is unknown: {did_you_mean(name, list(BUILTIN_OBJECTIVES))}use one "
                          f"of {', '.join(BUILTIN_OBJECTIVES)}, or your own as 'package.module:attribute'")
    check_call(factory, dict(kwargs), "objective.kwargs", name)
    objective = factory(**kwargs)
    if isinstance(objective, type) or _missing_methods(objective):
        missing = ", ".join(_missing_methods(objective)) if not isinstance(objective, type) else "an instance"
        raise ConfigError(f"objective.name={name!r} returned {_describe(objective)}, not an objective (it lacks "
                          f"{missing}; an objective has loss(output, batch), evaluate(output, batch), summarize(sums))")
    return check_objective(objective)
