"""One iteration of UDA training: one step, three sources of target supervision.

:class:`UDATrainer` runs one iteration of MIC's DACS self-training
(lhoyer/MIC ``seg/mmseg/models/uda/dacs.py`` ``forward_train`` and
``masking_consistency_module.py``), in MIC's order:

1. ``zero_grad``; with an EMA teacher, ``ema.update(student, i)`` (copy at
   ``i = 0``, ``α = min(1 - 1/(i + 1), 0.999)`` afterwards);
2. supervised HRDA loss on the source crops (+ ImageNet feature distance on
   thing classes, λ 0.005), backward;
3. teacher pseudo-labels of the target crops (HRDA ``encode_decode``, detail
   by overlapping slide) and their weight: the fraction of pixels whose
   max-softmax is ≥ ``pseudo_threshold``;
4. ClassMix of half the source classes into the target crops, colour jitter
   and blur, loss with the per-pixel weights, backward;
5. MIC: the ``mask_mode`` images (``separate``: first source + first target
   crop) with 70 % of their 64-px blocks zeroed, loss with the unmixed
   pseudo-labels, fused loss × ``mask_lambda``, backward. The target weight
   is the unmixed pseudo weight with the EMA teacher (MIC) and the
   ClassMix-mixed weight of step 4 with a frozen teacher (the original CKD,
   ``ckd_single.py``; see :func:`~uda.train.masking.masked_pseudo_weight`);
6. ``optimizer.step()``, ``scheduler.step()``.

``runner.precision: bf16`` runs every forward pass (student, teacher,
feature distance) under ``torch.autocast(dtype=torch.bfloat16)``; weights,
gradients, optimizer state and losses stay fp32 (the losses cast their logits
to fp32; bf16 needs no loss scaling). ``runner.channels_last`` puts the
models and input crops in NHWC memory layout for the convolutions. MIC trains
in fp32, which stays the preset default.

The pseudo-label source is the only difference between the entry points:

* ``teacher='ema'``: MIC (the ``teacher`` entry point trains a MIC model);
* a frozen segmentor: the distillation (``distill``, the original CKD
  student learning from a fixed MIC teacher);
* ``teacher=None``: source only (steps 3-5 skipped; MIC's ``source_only``),
  the baseline a UDA model must beat.

Every random draw of iteration ``i`` (HRDA detail crop, ClassMix classes,
jitter, blur, masks, dropout) comes from generators reseeded from
``(seed, rank, i)`` at the start of the iteration, and the batch of
iteration ``i`` is built the same way (:mod:`uda.train.batches`). A run
resumed from a checkpoint at iteration ``N`` therefore repeats the
uninterrupted run's losses exactly from ``N`` on, given the model,
optimizer, scheduler and EMA states.

Loss names follow MIC: ``src.decode.loss_seg``, ``src.decode.hr.loss_seg``,
``src.loss_imnet_feat_dist``, ``mix.decode.loss_seg``,
``masked.decode.loss_seg`` …; ``loss`` is the sum of every key that
contains ``loss``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from uda.metrics import logits_to_labels
from uda.precision import autocast

from .augment import DACSAugmentation
from .batches import STREAM_STEP, iteration_seed, seed_everything
from .distributed import DistContext
from .feature_distance import ImageNetFeatureDistance
from .masking import build_mask_generator, mask_mode_uses_aug, masked_pseudo_weight, select_masked_batch
from .optim import build_lr_scheduler, build_optimizer, current_lrs
from .settings import TrainConfigError, check_runtime, positive_int
from .teacher import EMATeacher, FrozenTeacher, Teacher, pseudo_label_and_weight, unwrap_model

__all__ = ["TrainForward", "StepOutput", "UDATrainer"]

TeacherArg = str | nn.Module | None


class TrainForward(nn.Module):
    """Routes ``__call__`` to ``forward_train`` so DistributedDataParallel
    (which wraps ``forward``) synchronises the training forwards."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.segmentor.forward_train(*args, **kwargs)


def _sum_losses(losses: Mapping[str, Any]) -> torch.Tensor:
    """MIC's ``_parse_losses`` total: every entry whose key contains 'loss'."""
    terms = [v for k, v in losses.items() if "loss" in k]
    if not terms:
        raise ValueError(f"No loss in {sorted(losses)}.")
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _detached(losses: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}{k}": v.detach().float() for k, v in losses.items() if torch.is_tensor(v) and v.dim() == 0
    }


@dataclass
class StepOutput:
    """What one iteration reports.

    Attributes:
        log_vars: Scalar tensors (detached, on the device): the losses and
            accuracies under MIC's names, ``loss`` (their total),
            ``pseudo.confident_fraction`` / ``pseudo.mean_confidence``.
        debug: First image of each stage (CPU tensors) when asked for:
            ``source_img``, ``source_gt``, ``source_pred``, ``target_img``,
            ``pseudo_label``, ``mixed_img``, ``mixed_label``, ``mixed_pred``,
            ``masked_img``, ``masked_label``.
    """

    log_vars: dict[str, torch.Tensor]
    debug: dict[str, torch.Tensor] | None = None


def _prediction(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The first image's class ids at ``size``, on the CPU (a debug image)."""
    return logits_to_labels(logits[:1], size)[0].cpu()


class UDATrainer:
    """One model, its optimizer and schedule, and the pseudo-label source.

    Args:
        model: The segmentor to train (an ``HRDASegmentor`` freshly built
            from the preset, i.e. with its ImageNet weights: the feature
            distance keeps a frozen copy of this backbone).
        cfg: The resolved preset (``uda``, ``optimizer``, ``lr_config``,
            ``runner``, ``data.img_norm_cfg``).
        teacher: ``'ema'`` (MIC), a frozen teacher segmentor (distillation)
            or None (source only).
        seed: Run seed; iteration ``i`` reseeds every RNG from
            ``(seed, rank, i)``.
        ctx: Distribution context (device, rank); single CPU process if
            None.

    Example:
        >>> trainer = UDATrainer(build_segmentor(cfg['student']['model']),
        ...                      cfg, teacher=frozen_mic_model, seed=0)
        >>> out = trainer.train_step(batch, iteration=0)
        >>> float(out.log_vars['loss'])
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Mapping[str, Any],
        teacher: TeacherArg = "ema",
        seed: int = 0,
        ctx: DistContext | None = None,
    ) -> None:
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        self.cfg = cfg
        self.seed = int(seed)
        uda = cfg["uda"]
        self.precision, self.channels_last = check_runtime(cfg)
        # Before the feature-distance copy and the EMA teacher are made: they
        # run without gradients, where the backbones never recompute.
        if cfg["runner"].get("activation_checkpointing", False):
            backbone = getattr(model, "backbone", None)
            if not hasattr(backbone, "use_checkpoint"):
                raise TrainConfigError(
                    f"runner.activation_checkpointing: the backbone "
                    f"{type(backbone).__name__} cannot recompute its blocks."
                )
            backbone.use_checkpoint = True
        self.model = self._to_device(model)
        self.model.train()
        self.max_iters = positive_int(cfg, "runner.max_iters")

        lambda_ = float(uda.get("imnet_feature_dist_lambda", 0.0))
        self.feature_distance: ImageNetFeatureDistance | None = None
        if lambda_ > 0:
            self.feature_distance = ImageNetFeatureDistance.from_segmentor(
                self.model,
                lambda_=lambda_,
                classes=uda.get("imnet_feature_dist_classes"),
                scale_min_ratio=float(uda.get("imnet_feature_dist_scale_min_ratio", 0.75)),
            ).to(self.device)

        threshold = float(uda["pseudo_threshold"])
        self.teacher: Teacher | None
        if teacher is None:
            self.teacher = None
        elif isinstance(teacher, str):
            if teacher != "ema":
                raise ValueError(f"teacher must be 'ema', a segmentor or None, got {teacher!r}.")
            self.teacher = EMATeacher(self.model, float(uda["alpha"]), threshold).to(self.device)
        else:
            self.teacher = FrozenTeacher(self._to_device(teacher), threshold)
        for key in ("mask_alpha", "mask_pseudo_threshold"):
            if str(uda.get(key, "same")) != "same":
                raise TrainConfigError(
                    f"uda.{key} must be 'same' (MIC's cs2acdc setting: the "
                    f"masked loss reuses the teacher's pseudo-labels), got "
                    f"{uda[key]!r}."
                )
        try:
            self.augmentation = DACSAugmentation.from_config(cfg)
            self.mask_mode = str(uda["mask_mode"])
            self.mask_uses_aug = mask_mode_uses_aug(self.mask_mode)
            self.mask_generator = build_mask_generator(uda.get("mask_generator"))
        except ValueError as err:
            raise TrainConfigError(str(err)) from None
        self.mask_lambda = float(uda.get("mask_lambda", 1.0))
        if self.mask_lambda <= 0:
            self.mask_generator = None

        self.forward_module: nn.Module = TrainForward(self.model)
        if self.ctx.distributed:
            self.forward_module = nn.parallel.DistributedDataParallel(
                self.forward_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        try:
            self.optimizer = build_optimizer(self.model, cfg)
            self.scheduler = build_lr_scheduler(self.optimizer, cfg)
        except ValueError as err:
            raise TrainConfigError(str(err)) from None
        self.generator = torch.Generator(device=self.device)

    # ------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``'mic'``, ``'distill'`` or ``'source_only'``."""
        if self.teacher is None:
            return "source_only"
        return "mic" if isinstance(self.teacher, EMATeacher) else "distill"

    def _to_device(self, module: nn.Module) -> nn.Module:
        if self.channels_last:
            return module.to(self.device, memory_format=torch.channels_last)
        return module.to(self.device)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass precision context (``runner.precision``)."""
        return autocast(self.device, self.precision)

    def _reseed(self, iteration: int) -> None:
        step_seed = iteration_seed(self.seed, self.ctx.rank, iteration, STREAM_STEP)
        seed_everything(step_seed)
        self.generator.manual_seed(step_seed)

    def train_step(self, batch: Mapping[str, Any], iteration: int, debug: bool = False) -> StepOutput:
        """Run iteration ``iteration`` (0-based) on ``batch``.

        Args:
            batch: ``img`` (B, 3, H, W) and ``gt`` (B, H, W) source crops,
                ``target_img`` (B, 3, H, W) target crops (see
                :class:`~uda.train.batches.TrainBatches`).
            iteration: Iterations done before this one.
            debug: Also return the first image of each stage.
        """
        self._reseed(iteration)
        gen = self.generator
        dev = self.device
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.teacher, EMATeacher):
            self.teacher.update(self.model, iteration)
        img = self._input(batch["img"])
        gt = batch["gt"].to(dev, non_blocking=True).long()
        log_vars: dict[str, torch.Tensor] = {}
        shown: dict[str, torch.Tensor] = {}

        # 1. supervised source loss (+ ImageNet feature distance)
        with self.autocast():
            source = self.forward_module(
                img, gt, return_feat=self.feature_distance is not None, return_logits=debug, generator=gen
            )
            features = source.pop("features", None)
            logits = source.pop("decode.logits", None)
            source_loss = _sum_losses(source)
            if self.feature_distance is not None:
                fd_loss, fd_value = self.feature_distance(img, gt, features)
                source_loss = source_loss + fd_loss
        log_vars.update(_detached(source, "src."))
        if self.feature_distance is not None:
            log_vars["src.loss_imnet_feat_dist"] = fd_value.float()
        source_loss.backward()
        del features
        if debug:
            shown.update(
                source_img=img[0].detach().cpu(),
                source_gt=gt[0].cpu(),
                source_pred=_prediction(logits[0], gt.shape[-2:]),
            )
        del logits

        if self.teacher is not None:
            target_img = self._input(batch["target_img"])
            # 2. pseudo-labels of the target crops
            with self.autocast():
                teacher_logits = self.teacher(target_img).float()
            pseudo_label, pseudo_weight = pseudo_label_and_weight(
                teacher_logits, self.teacher.pseudo_threshold, self.teacher.weight_reduction
            )
            confidence = torch.softmax(teacher_logits.float(), 1).amax(1)
            log_vars["pseudo.confident_fraction"] = pseudo_weight.mean()
            log_vars["pseudo.mean_confidence"] = confidence.mean()
            del teacher_logits, confidence

            # 3. ClassMix + jitter + blur, weighted loss
            mixed = self.augmentation.mix(img, gt, target_img, pseudo_label, pseudo_weight, generator=gen)
            with self.autocast():
                mix = self.forward_module(
                    self._input(mixed.img),
                    mixed.label,
                    seg_weight=mixed.weight,
                    return_logits=debug,
                    generator=gen,
                )
            mix_logits = mix.pop("decode.logits", None)
            _sum_losses(mix).backward()
            log_vars.update(_detached(mix, "mix."))
            if debug:
                shown.update(
                    target_img=target_img[0].detach().cpu(),
                    pseudo_label=pseudo_label[0].cpu(),
                    mixed_img=mixed.img[0].detach().cpu(),
                    mixed_label=mixed.label[0, 0].cpu(),
                    mixed_pred=_prediction(mix_logits[0], gt.shape[-2:]),
                )
            # The masked loss's target weight: the mixed one for the
            # distillation (original CKD, ckd_single.py), the unmixed one for
            # MIC (dacs.py). Rebinding frees whichever is not needed.
            pseudo_weight = masked_pseudo_weight(self.mode, pseudo_weight, mixed.weight)
            del mix_logits, mixed

            # 4. MIC masked image consistency
            if self.mask_generator is not None:
                masked_img, masked_label, masked_weight = select_masked_batch(
                    self.mask_mode, img, gt, target_img, pseudo_label, pseudo_weight
                )
                if self.mask_uses_aug:
                    masked_img = self.augmentation.augment(masked_img, generator=gen)
                masked_img = self.mask_generator.mask_image(masked_img, gen)
                with self.autocast():
                    masked = self.forward_module(
                        self._input(masked_img), masked_label, seg_weight=masked_weight, generator=gen
                    )
                masked["decode.loss_seg"] = masked["decode.loss_seg"] * self.mask_lambda
                _sum_losses(masked).backward()
                log_vars.update(_detached(masked, "masked."))
                if debug:
                    shown.update(
                        masked_img=masked_img[-1].detach().cpu(), masked_label=masked_label[-1, 0].cpu()
                    )

        self.optimizer.step()
        self.scheduler.step()
        log_vars["loss"] = _sum_losses({k: v for k, v in log_vars.items() if "loss" in k})
        return StepOutput(log_vars, shown if debug else None)

    # ------------------------------------------------------------------
    @torch.no_grad()
    def synchronize_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts buffers at the start of each forward, so after a step
        each rank holds the statistics of its own last batch; call this
        before evaluating or saving so all ranks use the saved model.
        """
        if not self.ctx.distributed:
            return
        import torch.distributed as dist

        for buffer in unwrap_model(self.model).buffers():
            dist.broadcast(buffer, src=0)

    def learning_rates(self) -> dict[str, float]:
        """Current lr of each parameter group (``default``, ``head`` …)."""
        return current_lrs(self.optimizer)

    def resume_state(self) -> dict[str, Any]:
        """Everything but the model weights needed to continue exactly.

        The model weights travel in the registered checkpoint; this holds
        the optimizer and scheduler states and, for MIC, the EMA teacher.
        """
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if isinstance(self.teacher, EMATeacher):
            state["ema"] = {k: v.detach().cpu() for k, v in self.teacher.model.state_dict().items()}
        return state

    def load_resume_state(
        self, state: Mapping[str, Any], model_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Restore :meth:`resume_state` (and the model weights if given)."""
        if model_state is not None:
            unwrap_model(self.model).load_state_dict(dict(model_state))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(self.teacher, EMATeacher):
            if "ema" not in state:
                raise TrainConfigError("The resume state has no EMA teacher weights (it was not a MIC run).")
            self.teacher.model.load_state_dict(state["ema"])
