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
    cli.add_training_args(parser, default_model="cs2acdc-student")
    parser.add_argument("--teacher", default="models:/cs2acdc-teacher/latest",
                        help="teacher model URI (models:/NAME@ALIAS, models:/NAME/latest) or MIC checkpoint file")
    args = parser.parse_args(argv)
    cfg = cli.training_config(args)

    from uda.train.runner import TrainRequest, train

    train(TrainRequest("distill", cfg, vars(args), device=cli.resolve_device(args.device),
                       resume=args.resume, model_name=args.model_name or None, teacher=args.teacher))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
