"""`mlflow run . -e evaluate`: mIoU on ACDC val, or ACDC test submission PNGs."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    cli.add_device_arg(parser)
    parser.add_argument("--target-root", required=True)
    parser.add_argument("--model", default="models:/cs2acdc-student@serving",
                        help="model URI (models:/NAME@ALIAS, runs:/…) or checkpoint path")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--mode", default="", help="whole or slide (default: the preset's)")
    parser.add_argument("--batch-size", default="1")
    parser.add_argument("--label-ids", default="false")
    args = parser.parse_args(argv)
    cli.optional_int("batch_size", args.batch_size, minimum=1)
    cli.parse_bool("label_ids", args.label_ids)
    if args.mode not in ("", "whole", "slide"):
        raise cli.UserError(f"mode must be whole or slide, got {args.mode!r}.")
    cfg = cli.resolve_config(args.preset, args.cfg_options, data__target__root=args.target_root)
    return cli.log_pending_step("evaluate", vars(args), cfg, "Evaluation")


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
