"""`mlflow run . -e distill`: distil the frozen MIC teacher into the FAN student; every checkpoint a model version.

Multi-GPU: `torchrun --nproc_per_node=N entrypoints/distill.py --source-root … --target-root …`.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    cli.add_device_arg(parser)
    parser.add_argument("--source-root", required=True)
    parser.add_argument("--target-root", required=True)
    parser.add_argument("--teacher", default="models:/cs2acdc-teacher/latest",
                        help="teacher model URI (models:/NAME@ALIAS, models:/NAME/latest) or MIC checkpoint file")
    parser.add_argument("--iterations", default="")
    parser.add_argument("--checkpoint-interval", default="")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--resume", default="auto", help="auto, none or the run id to continue")
    parser.add_argument("--model-name", default="", help="registered model (default cs2acdc-student)")
    args = parser.parse_args(argv)
    cfg = cli.resolve_config(
        args.preset, args.cfg_options,
        data__source__root=args.source_root, data__target__root=args.target_root,
        seed=cli.optional_int("seed", args.seed),
        runner__max_iters=cli.optional_int("iterations", args.iterations, minimum=1),
        checkpoint_config__interval=cli.optional_int("checkpoint_interval", args.checkpoint_interval, minimum=1))

    from uda.train.runner import TrainRequest, train

    train(TrainRequest("distill", cfg, vars(args), device=cli.resolve_device(args.device),
                       resume=args.resume, model_name=args.model_name or None, teacher=args.teacher))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
