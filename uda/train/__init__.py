"""Building blocks of the UDA training loop (MIC / DACS self-training).

* :mod:`.augment` - the DACS strong augmentation: ClassMix, then
  :mod:`.photometric` colour jitter and blur.
* :mod:`.masking` - MIC block masks and the masked training batch.
* :mod:`.optim` - AdamW with mmcv custom-key multipliers, poly+warmup LR.
* :mod:`.teacher` - EMA teacher (MIC) and frozen teacher (distillation),
  their pseudo-labels and weights.
* :mod:`.feature_distance` - ImageNet feature distance on thing classes.

The training job itself (what ``teacher`` and ``distill`` run):

* :mod:`.trainer` - one iteration (``UDATrainer``); :mod:`.loop` - the fit
  and its validation; :mod:`.settings` - the checks of a preset that cannot train.
* :mod:`.runner` - the job: request, result, orchestration; :mod:`.teacher_source`
  - which teacher a ``-P teacher`` URI means; :mod:`.tracked_run` - which MLflow
  run to train in (new or resumed); :mod:`.reporting` - progress, metrics,
  images, validation and checkpoint registration.
* :mod:`.resume` - a run's resume state; :mod:`.batches` - its reproducible
  batches; :mod:`.distributed` - torchrun; :mod:`.draws` - seeded draws.
"""

from .augment import DACSAugmentation, MixedBatch, StrongAugParams, get_class_masks, one_mix
from .feature_distance import ImageNetFeatureDistance, downscale_label_ratio
from .masking import (
    MASK_MODES,
    BlockMaskGenerator,
    build_mask_generator,
    mask_mode_uses_aug,
    select_masked_batch,
)
from .optim import (
    PolyWarmupLR,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    current_lrs,
    poly_warmup_lr,
)
from .photometric import color_jitter, gaussian_blur
from .teacher import EMATeacher, FrozenTeacher, Teacher, ema_alpha, pseudo_label_and_weight, unwrap_model

__all__ = [
    "DACSAugmentation",
    "MixedBatch",
    "StrongAugParams",
    "color_jitter",
    "gaussian_blur",
    "get_class_masks",
    "one_mix",
    "pseudo_label_and_weight",
    "ImageNetFeatureDistance",
    "downscale_label_ratio",
    "MASK_MODES",
    "BlockMaskGenerator",
    "build_mask_generator",
    "mask_mode_uses_aug",
    "select_masked_batch",
    "PolyWarmupLR",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "current_lrs",
    "poly_warmup_lr",
    "EMATeacher",
    "FrozenTeacher",
    "Teacher",
    "ema_alpha",
    "unwrap_model",
]
