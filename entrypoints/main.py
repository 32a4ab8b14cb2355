"""`mlflow run .`: the pipeline on the embedded default (for now: prepare and show the data)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli, tracking  # noqa: E402
from uda.data.summary import prepare_roots, summarize  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    cli.add_device_arg(parser)
    parser.add_argument("--source-root", required=True)
    parser.add_argument("--target-root", required=True)
    parser.add_argument("--seed", default="0")
    args = parser.parse_args(argv)
    cfg = cli.resolve_config(args.preset, args.cfg_options, seed=cli.optional_int("seed", args.seed),
                             data__source__root=args.source_root, data__target__root=args.target_root)
    embedded = prepare_roots(args.source_root, args.target_root)
    summary = summarize(args.source_root, args.target_root)
    with tracking.entry_point_run("main", vars(args), cfg) as run:
        if embedded is not None:
            tracking.mlflow.log_dict(embedded.config.__dict__, "data/embedded_config.json")
        tracking.log_dataset_summary(summary, args.source_root, args.target_root)
    print(f"Data: {', '.join(f'{k} {v}' for k, v in summary.sizes.items() if k.count('/') == 1)}")
    print(f"Logged run {run.info.run_id}: sample images, class statistics and the resolved config.")
    print("Next: `mlflow ui` (then open http://127.0.0.1:5000) to look at it.")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
