"""`mlflow run . -e teacher`: train a MIC(HRDA) teacher, or import a published MIC checkpoint."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli  # noqa: E402
from uda.registry import TEACHER_MODEL_NAME  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_training_args(parser, default_model=TEACHER_MODEL_NAME)
    parser.add_argument("--checkpoint", default="", help="MIC checkpoint to import instead of training")
    args = parser.parse_args(argv)
    cfg = cli.training_config(args)
    checkpoint = args.checkpoint.strip()
    # Before any work: a bad name would otherwise fail after training.
    model_name = cli.check_training_args(args, "teacher", cfg)

    if checkpoint:  # the same code as `-e import -P role=teacher`
        from uda import importing

        request = importing.make_request(cfg, checkpoint, role="teacher", model_name=model_name)
        importing.import_checkpoints(request, vars(args), entry_point="teacher")
        return 0
    from uda.train.runner import TrainRequest, train

    train(
        TrainRequest(
            "teacher",
            cfg,
            vars(args),
            device=cli.start_compute(args),
            resume=args.resume,
            model_name=model_name,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
