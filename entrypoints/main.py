"""`mlflow run .`: the whole pipeline — data → (teacher ‖ source-only) → distill → soup → evaluate → `serving`.

Every step is a child run; a step that already finished with the same
parameters and code version is reused (MLflow's multistep pattern).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uda import cli, tracking, workflow, workflow_summary  # noqa: E402
from uda.data.roots import prepare_roots  # noqa: E402
from uda.data.summary import summarize  # noqa: E402
from uda.registry import STUDENT_MODEL_NAME  # noqa: E402
from uda.soup.promotion import superseded_note  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_config_args(parser)
    cli.add_device_arg(parser)
    parser.add_argument("--source-root", required=True)
    parser.add_argument("--target-root", required=True)
    parser.add_argument("--seed", default="", help="random seed (default: the preset's)")
    parser.add_argument("--soup-trials", default="", help="Optuna trials of the soup step")
    args = parser.parse_args(argv)
    cfg = cli.resolve_config(
        args.preset,
        args.cfg_options,
        seed=cli.optional_int("seed", args.seed),
        data__source__root=args.source_root,
        data__target__root=args.target_root,
    )
    soup_trials = cli.optional_int("soup_trials", args.soup_trials, minimum=1)
    cli.check_threads(args.threads)  # each step sets its own threads; main computes little
    cli.check_pretrained(cfg, ["teacher", "student"])  # both are trained; fail before any work
    embedded = prepare_roots(args.source_root, args.target_root)
    summary = summarize(args.source_root, args.target_root)
    with tracking.entry_point_run("main", vars(args), cfg) as run:
        if embedded is not None:
            tracking.mlflow.log_dict(embedded.config.__dict__, "data/embedded_config.json")
        tracking.log_dataset_summary(summary, args.source_root, args.target_root)
        steps = workflow.run_workflow(
            preset=args.preset,
            source_root=args.source_root,
            target_root=args.target_root,
            cfg_options=args.cfg_options,
            seed=args.seed,
            device=args.device,
            soup_trials=soup_trials,
            threads=args.threads,
            iterations=int(cfg["runner"]["max_iters"]),
        )
        method = workflow_summary.summarize_workflow(steps, workflow_summary.registered_as(steps))
        story = workflow_summary.format_summary(method, steps["soup"].version, STUDENT_MODEL_NAME)
        workflow_summary.log_summary(method, story)
    for step in steps.values():
        print(
            f"  {step.entry_point:11s} run {step.run_id}  "
            + ("reused" if step.reused else f"{step.seconds:.0f} s")
        )
    moved = superseded_note(STUDENT_MODEL_NAME, steps["soup"].version)
    if moved is None:
        print(
            f"Pipeline run {run.info.run_id} finished; `serving` points at the evaluated soup "
            f"(version {steps['soup'].version})."
        )
    else:  # a team's server: another run promoted its soup since
        print(
            f"Pipeline run {run.info.run_id} finished; `serving` has since moved to {moved}, "
            f"promoted by another run after this pipeline's soup (version {steps['soup'].version})."
        )
    print(story, end="")
    print(workflow.next_steps_text())
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
