"""AdamW with MIC's parameter-wise multipliers and mmcv's poly + warmup LR.

Parameter groups follow mmcv 1.x ``DefaultOptimizerConstructor`` with
``paramwise_cfg.custom_keys`` (MIC: ``head: lr_mult 10``, ``pos_block:
decay_mult 0``, ``norm: decay_mult 0``):

* a key matches a parameter when it is a *substring* of the parameter's full
  name (``decode_head.head.conv_seg.weight`` contains ``head``);
* keys are tried longest first, ties alphabetically (mmcv sorts
  ``sorted(sorted(keys), key=len, reverse=True)``), and only the *first*
  match applies: ``pos_block`` → ``head`` → ``norm``. So the BatchNorm
  parameters of the decode head get ``lr × 10`` *and keep* weight decay
  (``head`` wins over ``norm``), exactly as in MIC;
* a parameter no key matches gets the base lr and weight decay (MIC sets no
  ``norm_decay_mult``/``bias_*`` options, so mmcv's type-based rules are
  inert). The ``norm`` key only matches by *name*: e.g. FAN's ConvNeXt
  ``stem.1`` LayerNorm or its ``dwconv.bn`` keep weight decay.

mmcv makes one group per parameter; here parameters with the same
multipliers share a group (same updates, fewer groups, fused AdamW).

Learning rate (mmcv ``PolyLrUpdaterHook`` with ``by_epoch=False``): before
iteration ``i`` (0-based) every group gets::

    regular = (base - min_lr) * (1 - i / max_iters) ** power + min_lr
    lr      = regular * (1 - (1 - i / warmup_iters) * (1 - warmup_ratio))
              if i < warmup_iters (linear warmup) else regular

with ``base`` the group's initial lr (``lr × lr_mult``).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler

from .teacher import unwrap_model

__all__ = [
    "custom_keys_from_cfg",
    "match_custom_key",
    "build_param_groups",
    "build_optimizer",
    "poly_warmup_lr",
    "PolyWarmupLR",
    "build_lr_scheduler",
    "current_lrs",
]


def custom_keys_from_cfg(optimizer_cfg: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """mmcv ``custom_keys`` from the preset's flat ``optimizer`` section.

    ``head_lr_mult``, ``pos_block_decay_mult`` and ``norm_decay_mult`` are the
    three custom keys of MIC's ``paramwise_cfg`` (name substrings, not layer
    types).
    """
    return {
        "head": {"lr_mult": float(optimizer_cfg.get("head_lr_mult", 1.0))},
        "pos_block": {"decay_mult": float(optimizer_cfg.get("pos_block_decay_mult", 1.0))},
        "norm": {"decay_mult": float(optimizer_cfg.get("norm_decay_mult", 1.0))},
    }


def match_custom_key(name: str, custom_keys: Mapping[str, Any]) -> str | None:
    """The custom key mmcv applies to parameter ``name`` (None if none).

    Keys are tried longest first, then alphabetically; the first key that
    is a substring of the name wins.
    """
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return key
    return None


def build_param_groups(
    model: nn.Module, optimizer_cfg: Mapping[str, Any], custom_keys: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups with mmcv ``custom_keys`` semantics.

    Args:
        model: The student (DDP / compiled wrappers are unwrapped so names
            are ``backbone.*`` / ``decode_head.*``).
        optimizer_cfg: The preset's ``optimizer`` section (``lr``,
            ``weight_decay``, the ``*_mult`` keys).
        custom_keys: mmcv-style ``{key: {lr_mult, decay_mult}}``; defaults to
            :func:`custom_keys_from_cfg` of ``optimizer_cfg``.

    Returns:
        A list of groups ``{'params', 'lr', 'weight_decay', 'lr_mult',
        'decay_mult', 'key', 'names'}``, one per distinct ``(lr_mult,
        decay_mult)`` pair, in order of first appearance (``key``: the first
        custom key that produced the pair, or ``'default'``). Frozen
        parameters (``requires_grad=False``) are left out.
    """
    base_lr = float(optimizer_cfg["lr"])
    base_wd = float(optimizer_cfg.get("weight_decay", 0.0))
    if custom_keys is None:
        custom_keys = custom_keys_from_cfg(optimizer_cfg)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, param in unwrap_model(model).named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        key = match_custom_key(name, custom_keys)
        spec = custom_keys[key] if key is not None else {}
        lr_mult = float(spec.get("lr_mult", 1.0))
        decay_mult = float(spec.get("decay_mult", 1.0))
        group = groups.get((lr_mult, decay_mult))
        if group is None:
            group = groups[(lr_mult, decay_mult)] = {
                "params": [],
                "names": [],
                "lr": base_lr * lr_mult,
                "weight_decay": base_wd * decay_mult,
                "lr_mult": lr_mult,
                "decay_mult": decay_mult,
                "key": key or "default",
            }
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("The model has no trainable parameters.")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups`.

    Args:
        model: The student.
        cfg: A full preset (its ``optimizer`` section is used) or the
            ``optimizer`` section itself (``type: AdamW``, ``lr``, ``betas``,
            ``weight_decay``, multipliers, ``fused``: null = torch's fused
            AdamW kernel on CUDA and its foreach implementation elsewhere,
            true/false to force; the update is the same AdamW).
    """
    optimizer_cfg = cfg["optimizer"] if "optimizer" in cfg else cfg
    kind = optimizer_cfg.get("type", "AdamW")
    if kind != "AdamW":
        raise ValueError(f"optimizer.type must be 'AdamW' (MIC's optimizer), got {kind!r}.")
    lr = optimizer_cfg.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"optimizer.lr must be a positive number, got {lr!r}.")
    groups = build_param_groups(model, optimizer_cfg)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = optimizer_cfg.get("fused")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"optimizer.fused must be true, false or null (fused on CUDA), got {fused!r}.")
    if fused is None:
        fused = True if on_cuda else None
    betas = tuple(float(b) for b in optimizer_cfg.get("betas", (0.9, 0.999)))
    return torch.optim.AdamW(
        groups,
        lr=float(lr),
        betas=betas,  # type: ignore[arg-type]
        eps=float(optimizer_cfg.get("eps", 1e-8)),
        weight_decay=float(optimizer_cfg.get("weight_decay", 0.0)),
        fused=fused or None,
    )


def poly_warmup_lr(
    base_lr: float,
    iteration: int,
    max_iters: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup: str | None = "linear",
    warmup_iters: int = 0,
    warmup_ratio: float = 0.1,
) -> float:
    """mmcv's poly LR with warmup for iteration ``iteration`` (0-based).

    Args:
        base_lr: The group's initial lr.
        iteration: Iterations done so far (mmcv ``runner.iter``).
        max_iters: Total iterations (``runner.max_iters``).
        power: Poly exponent.
        min_lr: Final lr (absolute, the same for every group, as mmcv).
        warmup: ``'linear'``, ``'constant'``, ``'exp'`` or None.
        warmup_iters: Warmup length.
        warmup_ratio: lr factor at iteration 0 of the warmup.
    """
    progress = min(iteration, max_iters) / max_iters
    regular = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    if warmup is None or iteration >= warmup_iters:
        return regular
    if warmup == "linear":
        k = (1 - iteration / warmup_iters) * (1 - warmup_ratio)
        return regular * (1 - k)
    if warmup == "constant":
        return regular * warmup_ratio
    if warmup == "exp":
        return regular * warmup_ratio ** (1 - iteration / warmup_iters)
    raise ValueError(f"warmup must be 'linear', 'constant', 'exp' or None, got {warmup!r}.")


class PolyWarmupLR(LRScheduler):
    """Per-iteration poly decay with warmup, mmcv ``PolyLrUpdaterHook`` style.

    Call :meth:`step` once after every ``optimizer.step()``; during iteration
    ``i`` (``self.last_epoch == i``) each group's lr is
    :func:`poly_warmup_lr` of its initial lr, so the head's ×10 multiplier is
    kept. ``state_dict`` / ``load_state_dict`` resume it.

    Args:
        optimizer: The optimizer (groups' ``lr`` are their base lrs).
        max_iters: Total iterations.
        power: Poly exponent (1).
        min_lr: Final lr (0).
        warmup: ``'linear'`` (MIC), ``'constant'``, ``'exp'`` or None.
        warmup_iters: Warmup length (1500).
        warmup_ratio: Start factor of the warmup (1e-6).
        last_epoch: Index of the last iteration done (-1 = fresh start).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = 1.0,
        min_lr: float = 0.0,
        warmup: str | None = "linear",
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}.")
        if warmup not in ("linear", "constant", "exp", None):
            raise ValueError(f"lr_config.warmup must be 'linear', 'constant', 'exp' or null, got {warmup!r}.")
        if warmup is not None and (not isinstance(warmup_iters, int) or warmup_iters < 1):
            raise ValueError(f"lr_config.warmup_iters must be a positive integer, got {warmup_iters!r}.")
        if not 0 < warmup_ratio <= 1:
            raise ValueError(f"lr_config.warmup_ratio must be in (0, 1], got {warmup_ratio!r}.")
        self.max_iters = max_iters
        self.power = float(power)
        self.min_lr = float(min_lr)
        self.warmup = warmup
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, iteration: int) -> list[float]:
        """Every group's lr during iteration ``iteration``."""
        return [
            poly_warmup_lr(
                base,
                iteration,
                self.max_iters,
                self.power,
                self.min_lr,
                self.warmup,
                self.warmup_iters,
                self.warmup_ratio,
            )
            for base in self.base_lrs
        ]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self.lr_at(self.last_epoch)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], last_iter: int = -1
) -> PolyWarmupLR:
    """:class:`PolyWarmupLR` from a full preset (``lr_config`` and
    ``runner.max_iters``).

    Args:
        optimizer: The optimizer.
        cfg: The preset.
        last_iter: For resuming without a scheduler state: the last
            iteration done (-1 = fresh start). Prefer ``load_state_dict``.
    """
    lr_cfg = cfg["lr_config"]
    if lr_cfg.get("policy", "poly") != "poly":
        raise ValueError(f"lr_config.policy must be 'poly', got {lr_cfg['policy']!r}.")
    if last_iter >= 0:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return PolyWarmupLR(
        optimizer,
        int(cfg["runner"]["max_iters"]),
        power=float(lr_cfg.get("power", 1.0)),
        min_lr=float(lr_cfg.get("min_lr", 0.0)),
        warmup=lr_cfg.get("warmup", "linear"),
        warmup_iters=int(lr_cfg.get("warmup_iters", 0)),
        warmup_ratio=float(lr_cfg.get("warmup_ratio", 0.1)),
        last_epoch=last_iter,
    )


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{group key: lr}`` for logging (``default``, ``head``, ``norm``...)."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        out[str(group.get("key", i))] = float(group["lr"])
    return out
