"""The `ddp-kit` command: train, verify-resume, data converters, export."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from .checkpoint import CheckpointError
from .config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from .preemption import PREEMPTED_EXIT_CODE
    from .train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    return PREEMPTED_EXIT_CODE if result["status"] == "preempted" else 0


def _evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    cfg = load_config(args.config, args.overrides)
    result = evaluate_checkpoint(cfg, args.checkpoint, swa=args.swa)
    if result.pop("rank") == 0:
        print(json.dumps(result), flush=True)
    return 0


def _verify_resume(args: argparse.Namespace) -> int:
    from .verify import verify_resume

    return 0 if verify_resume(args.config, args.overrides, nproc=args.nproc, resume_nproc=args.resume_nproc,
                              stop_after=args.stop_after, timeout_s=args.timeout, rtol=args.rtol,
                              atol=args.atol) else 1


def _export(args: argparse.Namespace) -> int:
    from .weights import export_weights

    print(f"wrote {export_weights(args.checkpoint, args.out, swa=args.swa)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import data, launch

    parser = argparse.ArgumentParser(prog="ddp-kit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a YAML config (under torchrun, srun, or alone)")
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/digits.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=3 optim.lr=0.1")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="the objective's validation metrics of a checkpoint's weights")
    evaluate.add_argument("--config", required=True)
    evaluate.add_argument("--checkpoint", required=True, help="a ddp_kit checkpoint or any file load_weights reads")
    evaluate.add_argument("--swa", action="store_true", help="evaluate the SWA weights (BatchNorm recomputed)")
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value")
    evaluate.set_defaults(func=_evaluate)

    verify = commands.add_parser(
        "verify-resume", help="check that stopping and resuming gives bit-identical weights for your setup")
    verify.add_argument("--config", required=True)
    verify.add_argument("--nproc", type=int, default=None,
                        help="processes per run, as many as you will train with (torchrun when > 1); default: what "
                             "`torchrun --nproc_per_node=gpu` starts here, one per visible CUDA device, or 1 "
                             "without CUDA or with distributed.device: cpu")
    verify.add_argument("--stop-after", type=int, default=None,
                        help="optimizer step to stop the interrupted run at, between 1 and the run's last step "
                             "minus 1, checked before anything runs (default: just past the middle of the run)")
    verify.add_argument("--resume-nproc", type=int, default=None,
                        help="processes the resumed part runs on (default: --nproc); another number keeps the "
                             "global batch with another train.accum_steps (else train.batch_size), and the states "
                             "are compared within --rtol/--atol, BatchNorm running statistics left out")
    verify.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance across world sizes")
    verify.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance across world sizes")
    verify.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    verify.add_argument("overrides", nargs="*", metavar="section.key=value")
    verify.set_defaults(func=_verify_resume)

    data.register_cli(commands)
    export = commands.add_parser(
        "export", help="write a checkpoint's model weights as a plain state_dict file",
        description="Write the model (or SWA model) weights of a ddp_kit checkpoint as a plain state_dict file: "
                    "model.load_state_dict(torch.load(OUT, weights_only=True)) loads it without ddp_kit.")
    export.add_argument("checkpoint", type=Path, metavar="CKPT",
                        help="checkpoint file, e.g. runs/NAME/checkpoints/ckpt_step000001000.pt")
    export.add_argument("--out", type=Path, required=True, help="file to write, e.g. model.pt")
    export.add_argument("--swa", action="store_true", help="export the SWA (averaged) model instead")
    export.set_defaults(func=_export)

    launch.register_cli(commands)
    return parser


@record  # under torchrun, an uncaught exception's traceback goes to the error file torchrun reports
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .distributed import PeerFailed
    from .files import WriteError
    from .objectives import ObjectiveError
    from .state import ResumeError
    from .train import NonFiniteLossError
    from .verify import VerifyError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, ObjectiveError, ResumeError, NonFiniteLossError, VerifyError,
            WriteError, PeerFailed) as exc:
        # one write, not print's two (text, then newline): under PYTHONUNBUFFERED each is its own write(2), and
        # the ranks of a torchrun or srun job share one stream, so two ranks' errors could fuse into one line
        sys.stderr.write(f"ddp-kit: error: {exc}\n")
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
