"""`mlflow run . -e soup`: mix registered checkpoints by alias; move `serving` to a verified soup."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli, tracking  # noqa: E402
from uda.data.roots import prepare_roots  # noqa: E402
from uda.registry import DEFAULT_TEACHER_URI, STUDENT_MODEL_NAME  # noqa: E402
from uda.soup.ingredients import resolve_ingredients  # noqa: E402
from uda.soup.request import make_request  # noqa: E402
from uda.soup.step import run_soup  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    cli.add_device_arg(parser)
    parser.add_argument("--target-root", required=True)
    parser.add_argument("--model-name", default=STUDENT_MODEL_NAME)
    parser.add_argument(
        "--aliases", default="", help="comma-separated, e.g. iter-24000,iter-32000,iter-40000"
    )
    parser.add_argument("--weights", default="optuna", help="e.g. 3,3,4 (normalised), or optuna")
    parser.add_argument("--method", default="", help="optuna, greedy or uniform")
    parser.add_argument("--trials", default="")
    parser.add_argument("--objective", default="", help="miou or teacher-agreement")
    parser.add_argument("--promote", default="true", help="true, false or if-better")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER_URI, help="teacher URI for teacher-agreement")
    parser.add_argument("--study-storage", default="", help="Optuna storage: file or URL (default optuna.db)")
    parser.add_argument("--batch-size", default="", help="images per inference batch (default: by pixels)")
    parser.add_argument("--seed", default="", help="random seed (default: the preset's)")
    args = parser.parse_args(argv)
    aliases = [a.strip() for a in args.aliases.split(",") if a.strip()] or None
    cfg = cli.resolve_config(
        args.preset,
        args.cfg_options,
        data__target__root=args.target_root,
        seed=cli.optional_int("seed", args.seed),
        soup__aliases=aliases,
        soup__method=args.method or None,
        soup__trials=cli.optional_int("trials", args.trials, minimum=1),
        soup__objective=args.objective or None,
    )
    request = make_request(
        cfg,
        model_name=args.model_name,
        aliases=aliases,
        weights=args.weights,
        method=args.method,
        promote=args.promote,
        teacher=args.teacher,
        study_storage=args.study_storage,
    )
    batch_size = cli.optional_int("batch_size", args.batch_size, minimum=1)
    device = cli.start_compute(args)
    # Before the run starts: the teacher (only when the objective uses it),
    # the registered model and the aliases of the ingredients.
    if request.objective == "teacher-agreement":
        cli.check_model(request.teacher, "teacher")
    resolve_ingredients(request)
    prepare_roots(target_root=request.target_root)
    with tracking.entry_point_run("soup", vars(args), cfg):
        run_soup(request, device=device, batch_size=batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
