"""`mlflow run . -e distill`: distil the frozen MIC teacher into the FAN student; every checkpoint a model version.

Multi-GPU: `torchrun --nproc_per_node=N entrypoints/distill.py --source-root … --target-root …`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli  # noqa: E402
from uda.registry import DEFAULT_TEACHER_URI, STUDENT_MODEL_NAME  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_training_args(parser, default_model=STUDENT_MODEL_NAME)
    parser.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER_URI,
        help="teacher: models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, "
        "models:/m-<logged model id>, runs:/RUN_ID/PATH or a MIC checkpoint file",
    )
    args = parser.parse_args(argv)
    cfg = cli.training_config(args)
    # Before any work: the registry name (else it fails after training) and
    # the teacher's existence (else after data preparation).
    model_name = cli.check_training_args(args, "distill", cfg)

    from uda.train.runner import TrainRequest, train

    train(
        TrainRequest(
            "distill",
            cfg,
            vars(args),
            device=cli.start_compute(args),
            resume=args.resume,
            model_name=model_name,
            teacher=args.teacher,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
