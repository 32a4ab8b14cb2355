"""Teachers that produce target pseudo-labels: MIC's EMA teacher and the
frozen external teacher of the distillation (CKD).

Both expose ``pseudo_label(img) -> (labels, weight)``: the teacher's
``generate_pseudo_label`` logits of the whole target crop (HRDA
``encode_decode``: context at half resolution, detail by overlapping slide of
``hr_crop_size`` windows, as MIC's ``ema_model.generate_pseudo_label``),
then :func:`pseudo_label_and_weight`.

What the references do, and what is reproduced here:

* **EMA teacher** (lhoyer/MIC ``dacs.py`` ``_init_ema_weights`` /
  ``_update_ema``, ``teacher_module.py``): at iteration 0 its parameters are
  copied from the student; at iteration ``t > 0``, *before* the step's
  forward, ``ema = α·ema + (1 - α)·student`` with ``α = min(1 - 1/(t + 1),
  alpha)`` for every parameter (scalars included). MIC does *not* copy
  buffers: the teacher stays in training mode, so its BatchNorm layers
  normalise with the statistics of the target batch and keep their own
  running statistics; only Dropout and DropPath are switched off for the
  pseudo-label forward. ``batchnorm_train=False`` instead runs the teacher
  fully in eval mode and copies the student's buffers at every update.
* **Frozen teacher** (leoil/ACDC_UDA_seg ``ckd_single.py``, ``ca_model``): a
  loaded MIC model, never updated, ``eval()`` before every use (BatchNorm
  running statistics), pseudo-labels under ``torch.no_grad``.
* **Pseudo-label weight** (:func:`pseudo_label_and_weight`, lhoyer/MIC
  ``dacs.py``, itself from vikolss/DACS): the fraction of pixels whose
  max-softmax is ``>= pseudo_threshold``, over the *whole batch* in MIC (one
  number for all images), broadcast to a per-pixel map.
"""

from __future__ import annotations

import copy
import torch
import torch.nn as nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["Teacher", "EMATeacher", "FrozenTeacher", "ema_alpha", "pseudo_label_and_weight", "unwrap_model"]

try:  # timm's stochastic depth, used by the MiT / FAN backbones
    from timm.layers import DropPath as _TimmDropPath
except ImportError:  # pragma: no cover - timm is a dependency
    _TimmDropPath = ()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) / ``torch.compile``
    (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def ema_alpha(iteration: int, alpha: float) -> float:
    """MIC's EMA weight at ``iteration``: ``min(1 - 1/(t + 1), alpha)``."""
    return min(1 - 1 / (iteration + 1), alpha)


def pseudo_label_and_weight(
    logits: torch.Tensor, threshold: float = 0.968, reduction: str = "batch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence weight (DACS/MIC).

    Args:
        logits: ``(B, C, H, W)`` teacher logits.
        threshold: Softmax confidence needed to count a pixel as confident
            (``pseudo_threshold``, 0.968).
        reduction: ``'batch'``: one weight for the whole batch, the fraction
            of confident pixels over all images (MIC and the original
            distillation); ``'image'``: one weight per image.

    Returns:
        ``(labels, weight)``: ``(B, H, W)`` int64 argmax labels and a
        ``(B, H, W)`` float32 weight map (constant per image/batch).
    """
    if reduction not in ("batch", "image"):
        raise ValueError(f"reduction must be 'batch' or 'image', got {reduction!r}.")
    probs = torch.softmax(logits.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    confident = confidence >= threshold
    if reduction == "batch":
        fraction = confident.sum() / confident.numel()
        weight = fraction.expand_as(confidence).float()
    else:
        fraction = confident.flatten(1).sum(1) / confident[0].numel()
        weight = fraction.view(-1, 1, 1).expand_as(confidence).float()
    return labels, weight.contiguous()


def _is_stochastic(module: nn.Module) -> bool:
    return (
        isinstance(module, _DropoutNd)
        or (bool(_TimmDropPath) and isinstance(module, _TimmDropPath))
        or type(module).__name__ == "DropPath"
    )


class Teacher(nn.Module):
    """Common interface: a wrapped segmentor that labels target crops.

    Args:
        model: The teacher segmentor (has ``generate_pseudo_label``).
        pseudo_threshold: Confidence threshold of the pseudo weight (0.968).
        weight_reduction: ``'batch'`` (MIC) or ``'image'``, see
            :func:`pseudo_label_and_weight`.
    """

    def __init__(
        self, model: nn.Module, pseudo_threshold: float = 0.968, weight_reduction: str = "batch"
    ) -> None:
        super().__init__()
        if not hasattr(model, "generate_pseudo_label"):
            raise ValueError(
                f"The teacher must be a segmentor with "
                f"generate_pseudo_label (an HRDASegmentor), got "
                f"{type(model).__name__}."
            )
        if not 0 <= pseudo_threshold <= 1:
            raise ValueError(f"pseudo_threshold must be in [0, 1], got {pseudo_threshold}.")
        self.model = model
        self.pseudo_threshold = float(pseudo_threshold)
        self.weight_reduction = weight_reduction
        for param in self.model.parameters():
            param.requires_grad_(False)

    def _prepare(self) -> None:
        """Put the wrapped model into its pseudo-labelling mode."""
        raise NotImplementedError

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``(B, C, H, W)`` of whole target crops, no grad."""
        self._prepare()
        with torch.no_grad():
            return self.model.generate_pseudo_label(img)

    def pseudo_label(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels and weights of normalised target crops.

        Args:
            img: ``(B, 3, H, W)`` target crops.

        Returns:
            ``(labels, weight)``: ``(B, H, W)`` int64 and ``(B, H, W)``
            float32 (fraction of confident pixels, broadcast).
        """
        logits = self(img)
        return pseudo_label_and_weight(logits, self.pseudo_threshold, self.weight_reduction)


class EMATeacher(Teacher):
    """The student's exponential moving average (MIC / DAFormer teacher).

    Args:
        student: The student segmentor; deep-copied (wrappers removed).
        alpha: Upper bound of the EMA weight (0.999).
        pseudo_threshold: Confidence threshold (0.968).
        batchnorm_train: True (MIC): BatchNorm in training mode during the
            pseudo-label forward, buffers not copied from the student. False:
            eval mode, buffers copied at every :meth:`update`.
        weight_reduction: ``'batch'`` (MIC) or ``'image'``.

    Example:
        >>> teacher = EMATeacher(student, alpha=0.999)
        >>> for it in range(max_iters):
        ...     teacher.update(student, it)      # before the step
        ...     labels, weight = teacher.pseudo_label(target_img)
    """

    def __init__(
        self,
        student: nn.Module,
        alpha: float = 0.999,
        pseudo_threshold: float = 0.968,
        batchnorm_train: bool = True,
        weight_reduction: str = "batch",
    ) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"uda.alpha must be in [0, 1], got {alpha}.")
        super().__init__(copy.deepcopy(unwrap_model(student)), pseudo_threshold, weight_reduction)
        self.alpha = float(alpha)
        self.batchnorm_train = bool(batchnorm_train)

    def _pairs(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine = dict(self.model.named_parameters())
        theirs = dict(unwrap_model(student).named_parameters())
        if mine.keys() != theirs.keys():
            missing = sorted(set(mine) ^ set(theirs))[:5]
            raise ValueError(
                f"The student does not match the EMA teacher (differing parameters, e.g. {missing})."
            )
        return ([mine[k] for k in mine], [theirs[k].detach() for k in mine])

    @torch.no_grad()
    def update(self, student: nn.Module, iteration: int) -> float:
        """Copy (``iteration == 0``) or EMA-update from the student.

        Call once per iteration, before the step's forward (MIC order).

        Args:
            student: The student being trained.
            iteration: 0-based iteration index.

        Returns:
            The α used (0 for the initial copy: the teacher becomes the
            student).
        """
        ema, src = self._pairs(student)
        if iteration == 0:
            torch._foreach_copy_(ema, src)
            alpha = 0.0
        else:
            alpha = ema_alpha(iteration, self.alpha)
            torch._foreach_mul_(ema, alpha)
            torch._foreach_add_(ema, src, alpha=1 - alpha)
        if not self.batchnorm_train:
            theirs = dict(unwrap_model(student).named_buffers())
            for name, buf in self.model.named_buffers():
                buf.copy_(theirs[name])
        return alpha

    def _prepare(self) -> None:
        self.model.train(self.batchnorm_train)
        for module in self.model.modules():
            if _is_stochastic(module):
                module.training = False

    def train(self, mode: bool = True) -> EMATeacher:
        """No-op on the wrapped model: its mode is set for each forward."""
        self.training = mode
        return self


class FrozenTeacher(Teacher):
    """A fixed external teacher (the distillation's MIC model, ``ca_model``).

    Always in eval mode, never trainable: ``.train()`` is ignored.

    Args:
        model: The loaded teacher segmentor (used as is, not copied).
        pseudo_threshold: Confidence threshold (0.968).
        weight_reduction: ``'batch'`` (the original) or ``'image'``.
    """

    def __init__(
        self, model: nn.Module, pseudo_threshold: float = 0.968, weight_reduction: str = "batch"
    ) -> None:
        super().__init__(unwrap_model(model), pseudo_threshold, weight_reduction)
        self.model.eval()

    def _prepare(self) -> None:
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Keep the teacher in eval mode whatever the caller asks."""
        self.training = mode
        self.model.eval()
        return self
