#!/usr/bin/env python
"""Benchmark the recipe's hot paths in one run, fp32 eager vs bf16 + SDPA.

* ``student``: HRDA ``forward_train`` + backward of the student preset
  (FAN-L hybrid, batch 2 of 1024x1024 crops in ``--preset full``);
* ``teacher``: HRDA slide inference of the teacher preset (MiT-B5) on one
  1920x1080 ACDC-sized image (how pseudo-labels and evaluation run);
* ``student-slide``: the same slide inference with the student preset
  (FAN-L), what ``evaluate`` and the served model run per image;
* ``distill``: one whole distillation iteration of :class:`UDATrainer`
  (FAN-L student, frozen MiT-B5 HRDA teacher under ``no_grad`` as in MIC,
  source loss + ImageNet feature distance, pseudo-labels, ClassMix, MIC
  masked loss, AdamW step) on batch 2 of 1024x1024 source and target crops.
  Each mode runs in a fresh process so its peak memory is its own (peak
  CUDA memory on a GPU, peak resident set size on a CPU). Modes:
  ``fp32-eager`` (fp32, SDPA math backend, foreach AdamW), ``bf16``
  (``runner.precision=bf16``, fused SDPA kernels), ``bf16+fused-adamw``
  (``optimizer.fused=true``) and ``bf16+fused-adamw+channels-last``
  (``runner.channels_last=true``) — each the preset keys a user sets.

Modes of ``student``, ``teacher`` and ``student-slide`` (same weights, same
inputs):

``fp32-eager``  fp32, TF32 off, attention forced onto SDPA's math backend
                (= the explicit softmax(QK^T)V of the reference code);
``bf16-sdpa``   bf16 autocast, SDPA with its fused kernels (flash /
                memory-efficient on GPU);
``bf16-sdpa-compile``  the same with ``torch.compile`` on the backbone and
                the two DAFormer heads (``--compile``).

Reports the median seconds of ``--repeats`` timed runs after ``--warmup``
runs (CUDA-synchronised) and the peak CUDA memory of each, as a Markdown
table. Needs only torch, timm and pyyaml (no mmcv / mlflow).

Usage::

    python tools/benchmark_models.py --preset tiny --device cpu   # ~1 min
    python tools/benchmark_models.py --preset full --device cuda [--compile]
    python tools/benchmark_models.py --preset full --jobs distill
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uda.config import load_config  # noqa: E402
from uda.models import build_segmentor, count_parameters  # noqa: E402
from uda.precision import autocast  # noqa: E402

PRESETS = {"tiny": "default", "full": "cs2acdc"}
# Timing needs no ImageNet weights (the full preset names files under
# pretrained/ that a benchmark machine need not have).
_NO_PRETRAINED = ["student.model.pretrained=null", "teacher.model.pretrained=null"]


def _config(preset: str) -> dict:
    return load_config(PRESETS[preset], _NO_PRETRAINED)


JOBS = ("student", "teacher", "student-slide", "distill")

# The preset keys each distill-iteration mode sets (see the module docstring).
DISTILL_MODES: dict[str, dict[str, Any]] = {
    "fp32-eager": dict(precision="fp32", channels_last=False, fused=False, math=True),
    "bf16": dict(precision="bf16", channels_last=False, fused=False, math=False),
    "bf16+fused-adamw": dict(precision="bf16", channels_last=False, fused=True, math=False),
    "bf16+fused-adamw+channels-last": dict(precision="bf16", channels_last=True, fused=True, math=False),
}


def _sdpa_context(math_only: bool):
    """Force SDPA onto its math backend (explicit attention) if asked."""
    if not math_only:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> tuple[float, int | None]:
    """Median wall time of ``fn`` and the peak CUDA memory while timing."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return statistics.median(times), peak


def _compile_parts(model: torch.nn.Module) -> None:
    """Compile the fixed-shape parts; the HRDA glue (random crops, slide
    stitching) stays eager to avoid recompiling per crop offset."""
    model.backbone = torch.compile(model.backbone, dynamic=False)
    head = model.decode_head
    head.head = torch.compile(head.head, dynamic=False)
    head.scale_attention = torch.compile(head.scale_attention, dynamic=False)


def _modes(compile_: bool) -> list[dict[str, Any]]:
    modes = [
        dict(name="fp32-eager", precision="fp32", math=True, compile=False),
        dict(name="bf16-sdpa", precision="bf16", math=False, compile=False),
    ]
    if compile_:
        modes.append(dict(name="bf16-sdpa-compile", precision="bf16", math=False, compile=True))
    return modes


def _configure_backends(device: str) -> None:
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True


def _peak_memory(device: str) -> tuple[int | None, str]:
    """Peak CUDA memory, or this process's peak resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated(), "CUDA"
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"


def distill_iteration(
    preset: str, device: str, mode_name: str, warmup: int, repeats: int, threads: int
) -> dict[str, Any]:
    """Time ``UDATrainer.train_step`` of a distillation in one mode.

    Meant to run alone in a fresh process (see :func:`_in_fresh_process`).
    """
    from uda.train.trainer import UDATrainer

    torch.set_num_threads(threads)
    _configure_backends(device)
    mode = DISTILL_MODES[mode_name]
    cfg = copy.deepcopy(_config(preset))
    cfg["runner"]["precision"] = mode["precision"]
    cfg["runner"]["channels_last"] = mode["channels_last"]
    cfg["optimizer"]["fused"] = mode["fused"]
    batch = int(cfg["data"]["samples_per_gpu"])
    crop_h, crop_w = cfg["data"]["source"]["crop_size"]
    num_classes = cfg["student"]["model"].get("num_classes", 19)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "img": torch.randn(batch, 3, crop_h, crop_w, generator=gen),
        "gt": torch.randint(0, num_classes, (batch, crop_h, crop_w), generator=gen),
        "target_img": torch.randn(batch, 3, crop_h, crop_w, generator=gen),
    }
    torch.manual_seed(0)
    teacher = build_segmentor(cfg["teacher"]["model"])
    student = build_segmentor(cfg["student"]["model"])
    ctx = None
    if device == "cuda":
        from uda.train.distributed import DistContext

        ctx = DistContext(device=torch.device("cuda", 0))
    trainer = UDATrainer(student, cfg, teacher=teacher, seed=0, ctx=ctx)
    if device == "cuda":  # the models and inputs, not the process setup
        torch.cuda.reset_peak_memory_stats()
    iteration = 0

    def step() -> None:
        nonlocal iteration
        with _sdpa_context(mode["math"]):
            out = trainer.train_step(inputs, iteration)
        iteration += 1
        if not torch.isfinite(out.log_vars["loss"]):
            raise FloatingPointError(f"{mode_name}: non-finite loss")

    try:
        seconds, _ = time_fn(step, device, warmup, repeats)
        peak, kind = _peak_memory(device)
        error = None
    except torch.cuda.OutOfMemoryError:
        seconds, (peak, kind), error = float("nan"), _peak_memory(device), "OOM"
    return {
        "mode": mode_name,
        "seconds": seconds,
        "peak_mem_bytes": peak,
        "memory": kind,
        "error": error,
        "input": f"{batch}x{crop_h}x{crop_w} source + target",
    }


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a spawned process and return its result."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        return pool.apply(fn, args)


def run_distill(preset: str, device: str, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Every distill-iteration mode, each in its own process."""
    cfg = _config(preset)
    student = cfg["student"]["model"]["backbone"]
    teacher = cfg["teacher"]["model"]["backbone"]
    rows, baseline = [], None
    for name in DISTILL_MODES:
        print(f"distill iteration: {name} ...", file=sys.stderr, flush=True)
        try:
            row = _in_fresh_process(
                distill_iteration, preset, device, name, warmup, repeats, torch.get_num_threads()
            )
        except Exception as err:  # report the mode as failed, go on
            traceback.print_exc()
            row = {
                "mode": name,
                "seconds": float("nan"),
                "peak_mem_bytes": None,
                "memory": None,
                "error": f"failed ({type(err).__name__})",
                "input": "",
            }
        if name == "fp32-eager":
            baseline = row["seconds"]
        seconds = row["seconds"]
        row.update(
            model=f"distill ({student} <- frozen {teacher})",
            task="UDATrainer.train_step",
            speedup=(baseline / seconds) if baseline and seconds == seconds and seconds > 0 else None,
        )
        rows.append(row)
    return rows


def run(
    preset: str, device: str, warmup: int, repeats: int, compile_: bool, jobs: tuple[str, ...] = JOBS
) -> dict[str, Any]:
    """Run the chosen benchmarks and return the results."""
    cfg = _config(preset)
    src, tgt = cfg["data"]["source"], cfg["data"]["target"]
    batch = int(cfg["data"]["samples_per_gpu"])
    crop_h, crop_w = src["crop_size"]
    tgt_w, tgt_h = tgt["img_scale"]  # mmseg img_scale is (w, h)
    num_classes = cfg["student"]["model"].get("num_classes", 19)
    _configure_backends(device)

    results: dict[str, Any] = {
        "preset": preset,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "rows": [],
        "params": {},
    }

    gen = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, crop_h, crop_w, generator=gen).to(device)
    label = torch.randint(0, num_classes, (batch, 1, crop_h, crop_w), generator=gen).to(device)
    test_img = torch.randn(1, 3, tgt_h, tgt_w, generator=gen).to(device)

    model_jobs = [
        ("student", cfg["student"]["model"], "train fwd+bwd", f"{batch}x{crop_h}x{crop_w}"),
        ("teacher", cfg["teacher"]["model"], "slide inference", f"1x{tgt_h}x{tgt_w}"),
        # what `evaluate` and `mlflow models serve` run per image
        ("student-slide", cfg["student"]["model"], "slide inference", f"1x{tgt_h}x{tgt_w}"),
    ]
    for role, model_cfg, task, shape in model_jobs:
        if role not in jobs:
            continue
        print(f"{role}: {task} ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        base = build_segmentor(model_cfg).to(device)
        results["params"][model_cfg["backbone"]] = count_parameters(base)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        baseline = None
        for mode in _modes(compile_):
            model = build_segmentor(model_cfg).to(device)
            model.load_state_dict(state)
            if mode["compile"]:
                _compile_parts(model)
            if role == "student":
                model.train()
                crop_gen = torch.Generator().manual_seed(1)

                def step(model=model, mode=mode, crop_gen=crop_gen):
                    with _sdpa_context(mode["math"]), autocast(device, mode["precision"]):
                        losses = model.forward_train(img, label, generator=crop_gen)
                    loss = sum(v for k, v in losses.items() if "loss" in k)
                    loss.backward()
                    model.zero_grad(set_to_none=True)

                fn = step
            else:
                model.eval()

                def infer(model=model, mode=mode):
                    with torch.no_grad(), _sdpa_context(mode["math"]), autocast(device, mode["precision"]):
                        model.inference(test_img, "slide")

                fn = infer
            try:
                seconds, peak = time_fn(fn, device, warmup, repeats)
                error = None
            except torch.cuda.OutOfMemoryError:
                seconds, peak, error = float("nan"), None, "OOM"
                torch.cuda.empty_cache()
            except Exception as err:  # e.g. torch.compile without a compiler
                traceback.print_exc()
                seconds, peak = float("nan"), None
                error = f"failed ({type(err).__name__})"
                if device == "cuda":
                    torch.cuda.empty_cache()
            if mode["name"] == "fp32-eager":
                baseline = seconds
            results["rows"].append(
                {
                    "model": f"{role} ({model_cfg['backbone']})",
                    "task": task,
                    "input": shape,
                    "mode": mode["name"],
                    "seconds": seconds,
                    "peak_mem_bytes": peak,
                    "error": error,
                    "memory": "CUDA" if peak is not None else None,
                    "speedup": (baseline / seconds)
                    if baseline and seconds == seconds and seconds > 0
                    else None,
                }
            )
            del model, fn
            if device == "cuda":
                torch.cuda.empty_cache()
        del base
    if "distill" in jobs:
        results["rows"] += run_distill(preset, device, warmup, repeats)
    return results


def to_markdown(results: dict[str, Any]) -> str:
    """Render the results as a Markdown table plus parameter counts."""
    lines = [
        f"Device: {results['device_name']} ({results['device']}), torch "
        f"{results['torch']}, preset `{results['preset']}`",
        "",
        "| model | task | input | mode | s / iter (median) | peak memory | speed-up vs fp32 |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        secs = row["error"] or f"{row['seconds']:.4f}"
        mem = (
            "-"
            if row["peak_mem_bytes"] is None
            else f"{row['peak_mem_bytes'] / 2**30:.2f} GiB {row['memory']}"
        )
        speed = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(
            f"| {row['model']} | {row['task']} | {row['input']} | {row['mode']} | {secs} | {mem} | {speed} |"
        )
    lines.append("")
    for name, count in results["params"].items():
        lines.append(f"- {name} HRDA/DAFormer: {count / 1e6:.2f} M parameters")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny: embedded default models and inputs; "
        "full: FAN-L student / MiT-B5 teacher at recipe "
        "resolution (default: tiny)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 1 tiny, 3 full)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 tiny, 10 full)")
    parser.add_argument(
        "--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)} (default: all)"
    )
    parser.add_argument("--compile", action="store_true", help="also measure bf16 + SDPA + torch.compile")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here.")
    full = args.preset == "full"
    warmup = args.warmup if args.warmup is not None else (3 if full else 1)
    repeats = args.repeats if args.repeats is not None else (10 if full else 3)
    if warmup < 0 or repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1.")
    jobs = tuple(j.strip() for j in args.jobs.split(",") if j.strip())
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown or not jobs:
        parser.error(f"--jobs: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(JOBS)}.")
    results = run(args.preset, device, warmup, repeats, args.compile, jobs)
    print(to_markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
