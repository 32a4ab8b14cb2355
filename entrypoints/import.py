"""`mlflow run . -e import`: register published checkpoints (the original's distillation and soup
files, MIC teachers, state dicts) as versions of a registered model, without training."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    parser.set_defaults(preset="cs2acdc")  # the published files are the full recipe's models
    parser.add_argument("--checkpoints", required=True, help="comma-separated checkpoint files")
    parser.add_argument(
        "--role", default="student", help="student or teacher: the preset section that gives the architecture"
    )
    parser.add_argument(
        "--prefix",
        default="auto",
        help="sub-model of an mmcv UDA file: auto (model.), none, model, ema_model, imnet_model, ca_model",
    )
    parser.add_argument(
        "--aliases",
        default="",
        help="one alias per file (none for no alias); default iter-<N> from each file",
    )
    parser.add_argument("--model-name", default="", help="registered model (default cs2acdc-<role>)")
    args = parser.parse_args(argv)
    cfg = cli.resolve_config(args.preset, args.cfg_options)

    from uda import importing

    request = importing.make_request(
        cfg,
        args.checkpoints,
        role=args.role,
        prefix=args.prefix,
        aliases=args.aliases,
        model_name=cli.check_model_name(args.model_name),
    )
    importing.import_checkpoints(request, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
