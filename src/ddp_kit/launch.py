"""`ddp-kit launch`: start training under torchrun with the settings crash restarts need.

    ddp-kit launch --nproc-per-node 4 --max-restarts 3 --config configs/X.yaml [section.key=value ...]
    ddp-kit launch --nnodes 2 --nproc-per-node 4 --rdzv-endpoint node1:29400 --rdzv-id exp1 --config ...
    python -m ddp_kit.launch ...                                  # the same

It replaces itself with `python -m torch.distributed.run ... -m ddp_kit.cli train ...`, so torchrun receives
signals directly, with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment: by default torchrun lets the
workers share its rendezvous store, and after a worker crash the restarted group then reads the previous
group's addresses and fails to connect (PyTorch issue #135712; seen with gloo on torch 2.14 in 2 of 3 restarts).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_command(nproc_per_node: int, target: list[str], *, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "ddp_kit", max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run ... TARGET`, TARGET being `-m module args...` or `script args...`: on one
    machine with --standalone, on several with a c10d rendezvous at `rdzv_endpoint`."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise SystemExit("ddp-kit launch: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (a host every node "
                             "reaches; the same on every node) and --rdzv-id")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [*cmd, f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}", *target]


def train_command(config: str | os.PathLike, overrides: list[str], *, nproc_per_node: int = 1, **torchrun) -> list[str]:
    """`ddp-kit train --config CONFIG OVERRIDES...` under torchrun (`torchrun_command`'s options), or as one
    plain process when that is all it asks for."""
    train = ["-m", "ddp_kit.cli", "train", "--config", str(config), *overrides]
    if nproc_per_node == 1 and not torchrun:
        return [sys.executable, *train]
    return torchrun_command(nproc_per_node, train, **torchrun)


def _launch(args: argparse.Namespace) -> int:
    cmd = train_command(args.config, args.overrides, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                        rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, max_restarts=args.max_restarts)
    env = {**os.environ, **RESTART_ENV}
    shown = " ".join(f"{k}={v}" for k, v in RESTART_ENV.items()) + " " + shlex.join(cmd)
    if args.dry_run:
        print(shown)
        return 0
    print(f"ddp-kit launch: {shown}", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("launch", help="train under torchrun, set up for crash restarts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (run this command on each)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous, for several nodes")
    p.add_argument("--rdzv-id", default="ddp_kit", help="job id shared by the nodes of one run")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restarts of the worker group after a crash; each resumes from the newest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=_launch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_kit.launch")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
