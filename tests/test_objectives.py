"""Objectives: each built-in's loss equals torch's, its metrics summed over uneven batches (and over 1, 2 and 3
processes) equal the metric computed over the whole set at once (sklearn / numpy references), and every
mismatch between the objective and the data or model fails with a message naming what to fix."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from ddp_kit.config import ConfigError
from ddp_kit.objectives import (Classification, LanguageModel, Objective, ObjectiveError, Regression, Segmentation,
                                add_sums, batch_counts, best_metric, build_objective, check_objective, checked_loss,
                                mean_per_count, objective_from_functions)
from procs import run, torchrun_command

SCRIPTS = Path(__file__).parent / "scripts"
UNEVEN = (5, 11, 1, 20)  # batch sizes of a 37-row set


def summed(objective, output: torch.Tensor, batch: dict, sizes=UNEVEN) -> dict:
    """objective.summarize of its evaluate() sums added over consecutive batches of `sizes` rows."""
    totals, start = None, 0
    for size in sizes:
        rows = slice(start, start + size)
        totals = add_sums(totals, objective.evaluate(output[rows], {k: v[rows] for k, v in batch.items()}))
        start += size
    assert start == len(output)
    return objective.summarize(totals)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randint(high: int, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def test_classification_loss_and_metrics_over_uneven_batches():
    logits, labels = randn(37, 7), randint(7, 37)
    labels[::4] = -100
    kept = (labels != -100).numpy()
    objective = Classification(label_smoothing=0.1, top_k=(3,), num_classes=7)
    batch = {"label": labels, "image": torch.zeros(37, 1)}
    reference = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert objective.loss(logits, batch).item() == pytest.approx(reference.item(), rel=1e-12)
    metrics = summed(objective, logits, batch)
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-12)  # the smoothed loss, as trained
    order = np.argsort(-logits.numpy(), axis=1)
    target = labels.numpy()
    assert metrics["acc"] == int((order[:, 0] == target)[kept].sum()) / int(kept.sum())
    assert metrics["acc_top3"] == int((order[:, :3] == target[:, None]).any(1)[kept].sum()) / int(kept.sum())
    assert 0 < metrics["acc"] < metrics["acc_top3"] < 1
    assert add_sums(None, objective.evaluate(logits, batch))["count"].item() == kept.sum() == 27
    predicted = logits.argmax(1)
    assert (predicted == 0).sum() >= 3
    ignore_class_0 = summed(Classification(ignore_index=0, top_k=(1, 3)), logits, {"label": predicted})
    assert ignore_class_0["acc"] == ignore_class_0["acc_top3"] == 1.0  # rows of a real class, ignored, count nowhere
    assert best_metric(objective) == ("acc", "max")
    assert objective.loss(logits.bfloat16(), batch).dtype == torch.float32  # half-precision logits upcast
    with pytest.raises(ObjectiveError, match=r"num_classes=5 but the logits have 7 classes"):
        Classification(num_classes=5).loss(logits, batch)
    with pytest.raises(ObjectiveError, match=r"'label' has shape \(37, 1\); .* must be \(37,\)"):
        Classification().loss(logits, {"label": labels[:, None]})


def test_regression_losses_equal_torch_and_metrics_equal_sklearn():
    prediction, target, weight = randn(37, 3, seed=0), randn(37, 3, seed=1), randn(37, seed=2).abs()
    target[:, 2] += 5.0  # a mean far from 0: r2 must centre the target
    batch = {"target": target, "w": weight}
    for name, reference in [("mse", F.mse_loss(prediction, target)), ("l1", F.l1_loss(prediction, target)),
                            ("huber", F.huber_loss(prediction, target, delta=0.5))]:
        objective = Regression(loss=name, huber_delta=0.5)
        assert objective.loss(prediction, batch).item() == pytest.approx(reference.item(), rel=1e-12), name
        assert summed(objective, prediction, batch)["loss"] == pytest.approx(reference.item(), rel=1e-12), name
    y, yhat, w = target.numpy(), prediction.numpy(), weight.numpy()
    weighted = Regression(weight="w", loss="huber", huber_delta=0.5)
    per_sample = F.huber_loss(prediction, target, delta=0.5, reduction="none").mean(1).numpy()
    assert weighted.loss(prediction, batch).item() == pytest.approx(np.average(per_sample, weights=w), rel=1e-12)
    metrics = summed(weighted, prediction, batch)
    assert metrics["loss"] == pytest.approx(np.average(per_sample, weights=w), rel=1e-12)
    assert metrics["mse"] == pytest.approx(mean_squared_error(y, yhat, sample_weight=w), rel=1e-12)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y, yhat, sample_weight=w), rel=1e-12)
    assert metrics["r2"] == pytest.approx(r2_score(y, yhat, sample_weight=w), rel=1e-12)
    unweighted = summed(Regression(), prediction, batch)
    assert unweighted["r2"] == pytest.approx(r2_score(y, yhat), rel=1e-12)
    assert unweighted["r2"] != pytest.approx(metrics["r2"], rel=1e-3)  # the weights count
    assert best_metric(weighted) == ("r2", "max")
    assert weighted.loss(prediction.half(), batch).dtype == torch.float32


def test_regression_of_other_shapes_and_a_constant_target():
    prediction, target = randn(37, 2, 3, seed=3), randn(37, 2, 3, seed=4)
    target[:, 1, 2] = 0.0  # constant: sklearn scores such an output 0 unless predicted exactly
    y, yhat = target.reshape(37, 6).numpy(), prediction.reshape(37, 6).numpy()
    metrics = summed(Regression(), prediction, {"target": target})
    assert metrics["r2"] == pytest.approx(r2_score(y, yhat), rel=1e-12)
    assert metrics["mse"] == pytest.approx(mean_squared_error(y, yhat), rel=1e-12)
    prediction[:, 1, 2] = 0.0
    assert summed(Regression(), prediction, {"target": target})["r2"] == pytest.approx(
        r2_score(y, prediction.reshape(37, 6).numpy()), rel=1e-12)
    vector = summed(Regression(), prediction[:, 0, 0], {"target": target[:, 0, 0].float()})  # cast to float64
    assert vector["r2"] == pytest.approx(r2_score(target[:, 0, 0].float().double().numpy(),
                                                  prediction[:, 0, 0].numpy()), rel=1e-12)
    loss = Regression().loss(prediction[:, 0, 0], {"target": (target[:, 0, 0] * 10).long()})
    assert loss.dtype == torch.float64
    # the target (and weight) follow the output's dtype: a float64 target does not make a float32 model's loss
    # (and its backward) float64
    batch = {"target": target, "w": torch.ones(37, dtype=torch.float64)}
    assert Regression(weight="w").loss(prediction.float(), batch).dtype == torch.float32


def segmentation_reference(logits: np.ndarray, mask: np.ndarray, classes: int, ignore: int) -> dict:
    """Pixel accuracy and mean IoU counted pixel by pixel over the whole set."""
    prediction = logits.argmax(1)
    kept = mask != ignore
    target, predicted = mask[kept], prediction[kept]
    ious = []
    for c in range(classes):
        intersection = int(((target == c) & (predicted == c)).sum())
        union = int(((target == c) | (predicted == c)).sum())
        if union:
            ious.append(intersection / union)
    return {"pixel_acc": int((target == predicted).sum()) / int(kept.sum()), "miou": float(np.mean(ious)),
            "classes": len(ious)}


def test_segmentation_loss_pixel_accuracy_and_miou():
    classes = 5
    logits, mask = randn(37, classes, 4, 6), randint(4, 37, 4, 6).to(torch.uint8)  # class 4 never a target
    logits[:, 3] -= 100.0  # never predicted: class 3 is in the target only
    mask[mask == 2] = 1  # class 2 only predicted
    logits[:, 2] -= 100.0  # ... and never predicted: absent from both, no IoU
    logits[:5, 4] += 100.0  # class 4 predicted on the first rows: IoU 0, counted
    mask[:, 0, :3] = 255
    objective = Segmentation(num_classes=classes)
    batch = {"mask": mask}
    reference = F.cross_entropy(logits, mask.long(), ignore_index=255)
    assert objective.loss(logits, batch).item() == pytest.approx(reference.item(), rel=1e-12)
    metrics = summed(objective, logits, batch)
    expected = segmentation_reference(logits.numpy(), mask.numpy(), classes, 255)
    assert expected["classes"] == 4
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-12)
    assert metrics["pixel_acc"] == expected["pixel_acc"]
    assert metrics["miou"] == pytest.approx(expected["miou"], rel=1e-12)
    assert summed(objective, logits, {"mask": mask[:, None]}) == metrics  # N x 1 x H x W masks too
    assert best_metric(objective) == ("miou", "max")
    mask[3, 2, 2] = 7
    with pytest.raises(ObjectiveError, match=r"'mask' holds \[7\], outside the classes 0..4 and not ignore_index=255"):
        objective.evaluate(logits, batch)
    with pytest.raises(ObjectiveError, match=r"'mask' has shape \(37, 2, 3\); .* must be \(37, 4, 6\)"):
        objective.loss(logits, {"mask": mask[:, ::2, ::2]})


def test_language_model_loss_perplexity_and_token_counts():
    logits, target = randn(37, 6, 11), randint(11, 37, 6)
    target[::3, -2:] = -100
    objective = LanguageModel(output_key="logits")
    output = {"logits": logits, "hidden": torch.zeros(1)}
    batch = {"target": target}
    reference = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1))
    assert objective.loss(output, batch).item() == pytest.approx(reference.item(), rel=1e-12)
    totals, start = None, 0
    for size in UNEVEN:
        rows = slice(start, start + size)
        totals = add_sums(totals, objective.evaluate({"logits": logits[rows]}, {"target": target[rows]}))
        start += size
    metrics = objective.summarize(totals)
    assert totals["count"].item() == 37 * 6 - 13 * 2
    assert metrics["loss"] == pytest.approx(reference.item(), rel=1e-12)
    assert metrics["perplexity"] == pytest.approx(np.exp(reference.item()), rel=1e-12)
    assert batch_counts(objective, batch) == {"samples": 37, "tokens": 222}
    assert best_metric(objective) == ("loss", "min")
    with pytest.raises(ObjectiveError, match=r"logits have shape \(37, 6, 11\) and the batch field 'target' \(37, 5\)"):
        objective.loss(output, {"target": target[:, 1:]})


@pytest.mark.slow
def test_distributed_metrics_equal_one_process(tmp_path):
    """The four objectives over uneven shards of one dataset, sums all-reduced: 2 and 3 processes give the sums
    and metrics of one process (integer sums and ratios of them exactly)."""
    results = {}
    for nproc in (2, 3):
        out = tmp_path / f"metrics{nproc}.pt"
        run(torchrun_command(nproc, str(SCRIPTS / "objective_sums.py"), str(out)), timeout=120)
        results[nproc] = torch.load(out)
    sys.path.insert(0, str(SCRIPTS))
    try:
        from objective_sums import dataset, shard_totals
    finally:
        sys.path.remove(str(SCRIPTS))
    for name, (objective, output, batch) in dataset().items():
        single = shard_totals(objective, output, batch, rank=0, world_size=1)
        whole = objective.summarize(objective.evaluate(output, batch))  # one batch of every row
        assert objective.summarize(single) == pytest.approx(whole, rel=1e-12, abs=1e-12), name
        for nproc, saved in results.items():
            result = saved[name]
            assert result["sums"].keys() == single.keys() and result["metrics"].keys() == whole.keys()
            for key, value in result["sums"].items():
                if value.dtype == torch.int64:  # counts, hits, the confusion matrix
                    assert torch.equal(value, single[key]), (nproc, name, key)
                else:
                    torch.testing.assert_close(value, single[key], rtol=1e-12, atol=1e-12)
            for metric, value in result["metrics"].items():
                if metric in ("acc", "acc_top3", "pixel_acc"):  # ratios of counts: exact
                    assert value == whole[metric], (nproc, name, metric)
                else:
                    assert value == pytest.approx(whole[metric], rel=1e-12, abs=1e-12), (nproc, name, metric)


def test_missing_batch_fields_and_output_keys_are_named():
    logits = randn(4, 3)
    with pytest.raises(ObjectiveError, match=r"objective classification: the batch has no field 'label' "
                                             r"\(fields: image, mask\); set objective.kwargs.target"):
        Classification().loss(logits, {"image": logits, "mask": logits})
    with pytest.raises(ObjectiveError, match=r"objective regression: the batch has no field 'w' \(fields: target\); "
                                             r"set objective.kwargs.weight"):
        Regression(weight="w").loss(logits, {"target": logits})
    cases = [({"out": logits}, None, r"the model returned a dict \(keys: out\), not a tensor; set "
                                     r"objective.kwargs.output_key"),
             ({"out": logits}, "logits", r"the model's output is a dict without 'logits' \(keys: out\); set "
                                         r"objective.kwargs.output_key"),
             ((logits, logits), "logits", r"output is a tuple of 2; output_key='logits' is not an index"),
             ((logits, logits), 2, r"output is a tuple of 2; output_key=2 is not an index"),
             (logits, 0, r"output_key=0 needs a dict or tuple output, and the model returned a tensor of "
                         r"shape \(4, 3\)"),
             ({"logits": [1.0]}, "logits", r"output\['logits'\] is a list of 1, not a tensor")]
    for output, key, message in cases:
        with pytest.raises(ObjectiveError, match=message):
            Classification(output_key=key).loss(output, {"label": randint(3, 4)})
    labels = randint(3, 4)
    by_index = Classification(output_key=1).loss((torch.zeros(4, 3), logits), {"label": labels})
    assert torch.equal(by_index, F.cross_entropy(logits, labels))


def test_regression_refuses_shapes_that_would_broadcast():
    with pytest.raises(ObjectiveError, match=r"the model's output has shape \(8, 1\) but the batch field 'target' "
                                             r"has shape \(8,\); they must be equal"):
        Regression().loss(randn(8, 1), {"target": randn(8)})
    with pytest.raises(ObjectiveError, match=r"the weight field 'w' has shape \(8, 1\); it must be \(8,\)"):
        Regression(weight="w").loss(randn(8), {"target": randn(8), "w": randn(8, 1)})


def test_function_pair_objective_and_the_contract_checks():
    def loss(output, batch):
        return (output - batch["y"]) ** 2  # not reduced: refused

    def evaluate(output, batch):
        return {"loss": ((output - batch["y"]) ** 2).sum(), "count": torch.tensor(len(output))}

    objective = check_objective(objective_from_functions(loss, evaluate))
    assert isinstance(objective, Objective)
    output, batch = randn(6), {"y": randn(6, seed=1)}
    with pytest.raises(ObjectiveError, match=r"the loss function test_function_pair_objective_and_the_contract_checks"
                                             r".<locals>.loss returned a tensor of shape \(6,\), not a scalar: "
                                             r"reduce it"):
        checked_loss(objective, output, batch)
    good = objective_from_functions(lambda o, b: loss(o, b).mean(), evaluate)
    assert torch.equal(checked_loss(good, output, batch), F.mse_loss(output, batch["y"]))
    assert good.summarize(good.evaluate(output, batch)) == {"loss": ((output - batch["y"]) ** 2).sum().item() / 6}
    assert batch_counts(good, batch) == {"samples": 6} and best_metric(good) == ("loss", "min")
    with pytest.raises(ObjectiveError, match=r"mean_per_count divides every sum by the sum 'count', and evaluate "
                                             r"returned none \(sums: loss\)"):
        mean_per_count({"loss": torch.tensor(1.0, dtype=torch.float64)})
    with pytest.raises(ObjectiveError, match=r"returned a float, not a tensor"):
        checked_loss(objective_from_functions(lambda o, b: 1.0, evaluate), output, batch)
    for narrow in (torch.tensor(1.0), torch.tensor(1, dtype=torch.int32), torch.tensor(True)):
        with pytest.raises(ObjectiveError, match=rf"evaluate's sum 'loss' is {narrow.dtype}; return float64 or int64"):
            add_sums(None, {"loss": narrow, "count": torch.tensor(1)})
    with pytest.raises(ObjectiveError, match=r"objective_from_functions: loss is a NoneType, not a function"):
        objective_from_functions(None, evaluate)
    totals = add_sums(None, evaluate(output, batch))
    with pytest.raises(ObjectiveError, match=r"the sums \['count'\] for one batch and \['count', 'loss'\]"):
        add_sums(totals, {"count": torch.tensor(1)})

    class NoSummarize:
        def loss(self, output, batch): ...
        def evaluate(self, output, batch): ...

    with pytest.raises(ObjectiveError, match=r"the objective NoSummarize has no method 'summarize'"):
        check_objective(NoSummarize())
    with pytest.raises(ObjectiveError, match=r"the objective is the class Classification, not an instance"):
        check_objective(Classification)
    wrong_best = Classification()
    wrong_best.best = ("acc", "maximum")
    with pytest.raises(ObjectiveError, match=r"best=\('acc', 'maximum'\); it must be \(metric name, 'max' or 'min'\)"):
        check_objective(wrong_best)


USER_OBJECTIVES = """
import torch
from ddp_kit.objectives import Regression, objective_from_functions

class Pairwise:
    best = ("loss", "min")

    def __init__(self, margin):
        self.margin = margin

    def loss(self, output, batch):
        return output.mean()

    def evaluate(self, output, batch):
        return {"loss": output.double().sum(), "count": torch.tensor(len(output))}

    def summarize(self, sums):
        return {"loss": sums["loss"].item() / sums["count"].item()}

ready = objective_from_functions(lambda o, b: o.mean(), lambda o, b: {})

def not_an_objective():
    return 3
"""


def test_build_objective_by_name_and_import_path(tmp_path, monkeypatch):
    (tmp_path / "user_objectives.py").write_text(USER_OBJECTIVES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_objective("segmentation", {"num_classes": 3}).num_classes == 3
    assert build_objective("regression", {"loss": "l1", "weight": "w"}).criterion == "l1"
    user = build_objective("user_objectives:Pairwise", {"margin": 0.5})
    assert type(user).__name__ == "Pairwise" and user.margin == 0.5
    import user_objectives
    assert build_objective("user_objectives:ready", {}) is user_objectives.ready
    cases = [("clasification", {}, "objective.name='clasification' is unknown: did you mean 'classification'? use "
                                   "one of classification, regression, segmentation, language_model"),
             ("regression", {"los": "l1"}, "objective.kwargs={'los': 'l1'} does not fit regression"),
             ("regression", {"loss": "mae"}, "loss='mae' is unknown: use mse, l1 (mean absolute error) or huber"),
             ("segmentation", {}, "missing a required argument: 'num_classes'"),
             ("classification", {"top_k": [0]}, "top_k=[0] must be a list of positive integers"),
             ("user_objectives:Pairwse", {}, "user_objectives has no attribute 'Pairwse'; did you mean 'Pairwise'?"),
             ("no_such_pkg.objectives:Loss", {}, "objective.name='no_such_pkg.objectives:Loss': no module named "
                                                 "'no_such_pkg'"),
             ("user_objectives:", {}, "an import path is written 'package.module:attribute'"),
             ("user_objectives:Pairwise", {"margn": 1}, "objective.kwargs={'margn': 1} does not fit "
                                                        "user_objectives:Pairwise"),
             ("user_objectives:ready", {"margin": 1}, "is an objective already, so objective.kwargs={'margin': 1} "
                                                      "has nothing to go to"),
             ("user_objectives:not_an_objective", {}, "objective.name='user_objectives:not_an_objective' returned a "
                                                      "int, not an objective (it lacks loss, evaluate, summarize"),
             ("regression", ["l1"], "objective.kwargs=['l1'] must be a mapping")]
    for name, kwargs, fragment in cases:
        with pytest.raises(ConfigError) as error:
            build_objective(name, kwargs)
        assert fragment in str(error.value), (name, str(error.value))
