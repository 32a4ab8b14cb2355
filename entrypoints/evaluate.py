"""`mlflow run . -e evaluate`: mIoU on ACDC val, or ACDC test submission PNGs."""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli, evaluation, tracking  # noqa: E402
from uda.data.roots import prepare_roots  # noqa: E402
from uda.models.foreign import role_model_cfg  # noqa: E402
from uda.registry import STUDENT_MODEL_NAME  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    cli.add_device_arg(parser)
    parser.add_argument("--target-root", required=True, help="ACDC root (nested or flattened)")
    parser.add_argument(
        "--model",
        default=f"models:/{STUDENT_MODEL_NAME}@serving",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest, "
        "models:/m-<logged model id>, runs:/RUN_ID/PATH or a checkpoint file",
    )
    parser.add_argument(
        "--role",
        default="student",
        help="a foreign checkpoint file (MIC, the original's distillation or soup): the "
        "preset section with its architecture, student or teacher",
    )
    parser.add_argument("--split", default="val", help="val (mIoU) or test (submission PNGs)")
    parser.add_argument("--mode", default="", help="whole or slide (default: the model's test_cfg)")
    parser.add_argument("--batch-size", default="1")
    parser.add_argument(
        "--precision",
        default="fp32",
        help="fp32, or bf16 autocast (GPU; about the same mIoU, see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--label-ids", default="false", help="test: write Cityscapes labelIds instead of trainIds"
    )
    args = parser.parse_args(argv)
    split = evaluation.check_split(args.split)
    mode = evaluation.check_mode(args.mode)
    precision = evaluation.check_precision(args.precision)
    batch_size = cli.optional_int("batch_size", args.batch_size, minimum=1) or 1
    label_ids = cli.parse_bool("label_ids", args.label_ids)
    device = cli.start_compute(args)
    cfg = cli.resolve_config(args.preset, args.cfg_options, data__target__root=args.target_root)
    # The model exists and is a segmentor (no weights read yet), pinned to
    # its version; the only model parameter, so the message needs no prefix.
    reference = cli.check_model(args.model, None)

    # Everything that can be wrong is checked before the run logs anything.
    prepare_roots(target_root=args.target_root)
    dataset = evaluation.build_dataset(args.target_root, split, cfg["data"]["target"]["img_scale"])
    # A foreign file does not describe its model: the preset's <role>.model does.
    foreign_cfg = role_model_cfg(cfg, args.role.strip())
    model, _ = evaluation.load_model(
        reference.uri, device, foreign_cfg, f"preset {cfg['name']!r} {args.role.strip()}.model"
    )
    options = dict(
        mode=mode,
        batch_size=batch_size,
        device=device,
        progress=True,
        precision=precision,
        num_workers=cfg["data"]["workers_per_gpu"],
    )

    with tracking.entry_point_run("evaluate", vars(args), cfg) as run:
        tracking.mlflow.set_tag("model_uri", args.model)
        tracking.log_dataset_inputs({f"acdc/{split}": args.target_root}, context="evaluation")
        tracking.log_model_inputs([reference.model_id])
        if split == "val":
            result = evaluation.evaluate(model, dataset, **options)
            evaluation.log_evaluation(result, model_id=reference.model_id)
            print(evaluation.format_table(result.table))
            done = f"mIoU {100 * result.table.miou:.2f} on {result.num_images} images"
        else:
            with tempfile.TemporaryDirectory(prefix="uda-submission-") as tmp:
                result = evaluation.write_submission(model, dataset, tmp, label_ids, **options)
                evaluation.log_submission(result)
            done = (
                f"{result.num_images} {result.folder.name} PNGs, zipped as artifact "
                f"submission/{result.zip_path.name}"
            )
    print(f"{done} ({result.images_per_second:.2f} images/s); run {run.info.run_id}.")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
