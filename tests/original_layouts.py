"""Checkpoint files in the layouts the original solution and MIC published.

Written from what those files hold (leoil/ACDC_UDA_seg @ b69db66: mmcv
``IterBasedRunner.save_checkpoint`` files of ``CKD_single`` and
``checkpoints/soup.py``; lhoyer/MIC ``latest.pth``), with the weights of
models built here, so that the import tests check real layouts:

* ``ckd_distill``: ``{'meta', 'state_dict', 'optimizer'}``; ``state_dict``
  holds ``model.*`` (the student), ``ca_model.*`` (the frozen MiT teacher)
  and ``imnet_model.*`` (the ImageNet copy of the student); ``meta`` is
  mmcv's (``iter``, ``epoch``, ``mmcv_version``, ``time``, ``CLASSES``,
  ``PALETTE``, ``config`` text, ``seed``, ``exp_name``, ``hook_msgs``);
  ``optimizer`` is an AdamW state dict with integer keys.
* ``ckd_soup``: ``{'state_dict': {model.*}, 'meta': {'PALETTE', 'CLASSES'}}``,
  every entry ``w1*p1 + w2*p2 + w3*p3`` paired by position, integer
  buffers included (they become floats), as the original's soup.py does.
* ``mic``: ``model.*``, ``ema_model.*``, ``imnet_model.*`` plus meta.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence

import torch

from uda.data.labels import CLASSES, PALETTE

STATE = Mapping[str, torch.Tensor]


def prefixed(state_dict: STATE, prefix: str) -> dict:
    return {prefix + k: v.clone() for k, v in state_dict.items()}


def _meta(iteration: int, seed: int = 29) -> dict:
    return {
        "mmcv_version": "1.7.0",
        "time": "Fri Jun  2 21:33:07 2023",
        "iter": iteration,
        "epoch": 1,
        "seed": seed,
        "exp_name": "csHR2acdcHR_mic_hrda_s2.py",
        "config": "_base_ = ['../_base_/default_runtime.py']\nseed = 29\n",
        "CLASSES": tuple(CLASSES),
        "PALETTE": [list(c) for c in PALETTE],
        "hook_msgs": {"last_ckpt": f"work_dirs/iter_{iteration}.pth"},
    }


def _adamw_state(state_dict: STATE) -> dict:
    params = [v for v in state_dict.values() if v.is_floating_point()]
    return {
        "state": {
            i: {
                "step": torch.tensor(float(7)),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
            for i, p in enumerate(params)
        },
        "param_groups": [
            {
                "lr": 6e-5,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.01,
                "amsgrad": False,
                "params": list(range(len(params))),
            }
        ],
    }


def ckd_distill(path: Path, student: STATE, teacher: STATE, imnet: STATE | None, iteration: int) -> Path:
    """An mmcv runner file of the original distillation."""
    state = {**prefixed(student, "model."), **prefixed(teacher, "ca_model.")}
    if imnet is not None:
        state.update(prefixed({k: v for k, v in imnet.items() if k.startswith("backbone.")}, "imnet_model."))
    torch.save({"meta": _meta(iteration), "state_dict": state, "optimizer": _adamw_state(student)}, path)
    return path


def ckd_soup(path: Path, files: Sequence[Path], weights: Sequence[float]) -> Path:
    """The original's soup.py: ``model.*`` only, paired by position."""
    states = [torch.load(f, weights_only=False)["state_dict"] for f in files]
    soup = {}
    for items in zip(*(s.items() for s in states)):
        key = items[0][0]
        if "imnet" in key or "ema" in key or "ca_" in key:
            continue
        soup[key] = sum(w * v for w, (_, v) in zip(weights, items))
    torch.save(
        {"state_dict": soup, "meta": {"PALETTE": [list(c) for c in PALETTE], "CLASSES": list(CLASSES)}}, path
    )
    return path


def mic(path: Path, model: STATE, iteration: int = 40000) -> Path:
    """MIC's published runner file (``latest.pth``)."""
    state = {
        **prefixed(model, "model."),
        **prefixed(model, "ema_model."),
        **prefixed({k: v for k, v in model.items() if k.startswith("backbone.")}, "imnet_model."),
    }
    torch.save(
        {"meta": _meta(iteration, seed=0), "state_dict": state, "optimizer": _adamw_state(model)}, path
    )
    return path


def perturbed(state_dict: STATE, seed: int) -> dict:
    """A distinct copy (each "checkpoint" of a fake run differs)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
        for k, v in state_dict.items()
    }
