"""The generator's command line, ``python -m uda.data.synthetic [--root DIR] [--force | --clean]``
(default root: the project's ``data/embedded``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..layouts import ACDC_CONDITIONS
from ..paths import EMBEDDED_ROOT
from .config import SyntheticConfig
from .embedded import ensure_embedded
from .ownership import NotGeneratedError, clean_embedded


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return w, h


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate (or reuse) the synthetic dataset."""
    defaults = SyntheticConfig()
    p = argparse.ArgumentParser(
        prog="python -m uda.data.synthetic",
        description="Generate the synthetic Cityscapes/ACDC-layout dataset.",
    )
    p.add_argument("--root", type=Path, default=EMBEDDED_ROOT, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--num-source-train", "--num-source", type=int, default=defaults.num_source_train)
    p.add_argument("--num-source-val", type=int, default=defaults.num_source_val)
    p.add_argument("--num-target-train", type=int, default=defaults.num_target_train, help="per condition")
    p.add_argument("--num-target-val", type=int, default=defaults.num_target_val, help="per condition")
    p.add_argument("--num-target-test", type=int, default=defaults.num_target_test, help="per condition")
    p.add_argument("--source-size", type=_parse_size, default=defaults.source_size, metavar="WxH")
    p.add_argument("--target-size", type=_parse_size, default=defaults.target_size, metavar="WxH")
    p.add_argument("--conditions", nargs="+", default=list(defaults.conditions), choices=ACDC_CONDITIONS)
    p.add_argument("--force", action="store_true", help="regenerate even if an up-to-date copy exists")
    p.add_argument(
        "--clean",
        action="store_true",
        help="remove the generated data under --root (only what the generator wrote)",
    )
    args = p.parse_args(argv)
    params = {k: v for k, v in vars(args).items() if k not in ("root", "force", "clean")}
    try:
        config = SyntheticConfig(**params)
    except ValueError as e:
        p.error(str(e))
    start = time.perf_counter()
    try:
        if args.clean:
            cleaned = clean_embedded(args.root)
            print("removed the generated data in " + (", ".join(map(str, cleaned)) or "nothing"))
            return 0
        data = ensure_embedded(args.root, progress=True, force=args.force, **params)
    except NotGeneratedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in args.root.rglob("*") if f.is_file())
    print(
        f"cityscapes: {data.cityscapes_root}\nacdc:       {data.acdc_root}\n"
        f"{size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s "
        f"(config {config.to_dict()})"
    )
    return 0
