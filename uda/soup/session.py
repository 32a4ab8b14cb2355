"""One soup run's scoring session: the cached images, the reused scorer, and every mix scored so far.

:meth:`SoupSession.open` decodes the tuning/report split of target val (and,
for the label-free objective, target train images labelled by the teacher)
once, on the scoring device, and builds the one segmentor every mix is
loaded into. The session then keeps each mix's tables by its weights, so no
mix is scored twice: an ingredient's own scores serve greedy soup, the
comparison and ``promote=if-better`` alike; and it times the search's trials.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uda.metrics import ConditionTable

from .ingredients import Checkpoints, IngredientRef
from .mixing import SoupError, mix_state_dicts
from .request import SoupRequest
from .scoring import ImageCache, SoupScorer

__all__ = ["SoupSession", "weights_key"]

#: Full val, added up from its two halves without running them again.
_UNION = {"val": ["tune", "report"]}


def weights_key(weights: Sequence[float]) -> tuple:
    """The weights as a dictionary key (rounded, so equal mixes meet)."""
    return tuple(round(float(w), 12) for w in weights)


@dataclass
class SoupSession:
    """The scorer of one soup run and what it has measured.

    Attributes:
        scorer: The reused segmentor on the cached images.
        loaders: One state-dict loader per ingredient.
        names: How messages name each ingredient.
        objective_subset: The split the weights are chosen on: ``'tune'``
            (objective ``miou``) or ``'agreement'`` (``teacher-agreement``).
        device: The scoring device (a registered version is loaded there).
        model_cfg: The ingredients' model config (for registering the soup).
        cache_seconds: Time spent filling the image cache.
        tables: Mix (:func:`weights_key`) → subset → table, every split.
        trial_seconds: Wall time of each mix the search scored that was not
            known yet (mix, load, score on the objective split).
        last_seconds: That of the last :meth:`objective` call; None when its
            score was known already.
        trials_logged: Trials numbered so far (greedy soup's nested runs).
    """

    scorer: SoupScorer
    loaders: list[Callable[[], Mapping[str, torch.Tensor]]]
    names: list[str]
    objective_subset: str
    device: str = "cpu"
    model_cfg: dict[str, Any] = field(default_factory=dict)
    cache_seconds: float = 0.0
    tables: dict[tuple, dict[str, ConditionTable]] = field(default_factory=dict)
    trial_seconds: list[float] = field(default_factory=list)
    last_seconds: float | None = None
    trials_logged: int = 0

    @classmethod
    def open(
        cls, request: SoupRequest, checkpoints: Checkpoints, device: str, batch_size: int | None
    ) -> SoupSession:
        """Caches the images and builds the scorer; logs the splits on the active run.

        Args:
            request: The soup request (root, conditions, scale, objective).
            checkpoints: The ingredients' files; the first one gives the architecture.
            device: Scoring device.
            batch_size: Images per inference batch (None: by pixel budget).
        """
        import mlflow

        from uda.data.layouts import scan_acdc
        from uda.models import build_from_checkpoint
        from uda.registry import load_segmentor

        from .scoring import split_tune_report, stratified_subset

        # --- data: decoded and normalised once, on the device -------------
        root = request.target_root
        val = scan_acdc(root, "val", conditions=request.conditions)
        tune, report = split_tune_report(val, request.tune_fraction)
        subsets = {"tune": tune, "report": report}
        if request.objective == "teacher-agreement":
            train = scan_acdc(root, "train", conditions=request.conditions)
            subsets["agreement"] = stratified_subset(train, len(tune))
        t0 = time.perf_counter()
        cache = ImageCache(subsets, request.img_scale, device, batch_size)
        cache_seconds = time.perf_counter() - t0
        mlflow.log_metrics({f"images.{k}": v for k, v in cache.sizes.items()})
        mlflow.log_dict({k: [s.name for s in v] for k, v in subsets.items()}, "soup/splits.json")
        print(
            "Images: "
            + ", ".join(f"{k} {v}" for k, v in cache.sizes.items())
            + f" (tune/report: {request.tune_fraction:g} of val per condition; "
            f"cached on {device} in {cache_seconds:.1f} s, "
            f"{cache.nbytes() / 2**20:.1f} MiB)"
        )

        model = build_from_checkpoint(checkpoints.paths[0]).eval().to(device)
        model_cfg = dict(model.model_cfg)
        scorer = SoupScorer(model, cache, num_classes=model.num_classes)
        if request.objective == "teacher-agreement":
            teacher, _ = load_segmentor(request.teacher, device=device)
            scorer.set_pseudo_labels("agreement", teacher)
            del teacher
        return cls(
            scorer=scorer,
            loaders=list(checkpoints.loaders),
            names=list(checkpoints.names),
            objective_subset="tune" if request.objective == "miou" else "agreement",
            device=device,
            model_cfg=model_cfg,
            cache_seconds=cache_seconds,
        )

    @property
    def cache(self) -> ImageCache:
        return self.scorer.cache

    @property
    def n(self) -> int:
        """Number of ingredients."""
        return len(self.loaders)

    @property
    def report_subsets(self) -> list[str]:
        """The subsets every compared model is scored on."""
        return ["tune", "report"] + (["agreement"] if self.objective_subset == "agreement" else [])

    @property
    def seconds_per_trial(self) -> float:
        """Mean of :attr:`trial_seconds`, NaN without any."""
        return sum(self.trial_seconds) / len(self.trial_seconds) if self.trial_seconds else math.nan

    def one_hot(self, index: int) -> list[float]:
        """The weights of ingredient ``index`` alone."""
        return [1.0 if i == index else 0.0 for i in range(self.n)]

    def evaluate(
        self, weights: Sequence[float], mixed: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, ConditionTable]:
        """Every split's table of a mix, scored once.

        Args:
            weights: The mix.
            mixed: Its state dict when the caller has it already (else an
                ingredient alone is loaded as is, a mix is mixed).
        """
        key = weights_key(weights)
        if key not in self.tables:
            one_hot = [i for i, w in enumerate(key) if w == 1.0]
            if mixed is not None:
                self.scorer.load(mixed)
            elif len(one_hot) == 1 and sum(key) == 1.0:
                self.scorer.load(self.loaders[one_hot[0]]())
            else:
                self.scorer.load(mix_state_dicts(self.loaders, list(weights), self.names))
            self.tables[key] = self.scorer.evaluate(self.report_subsets, union=_UNION)
        return self.tables[key]

    def objective(self, weights: Sequence[float]) -> float:
        """Objective-split mIoU of a mix; timed unless already known.

        Raises:
            SoupError: the split gives no mIoU (no labelled pixels).
        """
        key = weights_key(weights)
        self.last_seconds = None
        if key in self.tables:
            score = self.tables[key][self.objective_subset].miou
        else:
            t_start = time.perf_counter()
            self.scorer.load(mix_state_dicts(self.loaders, list(weights), self.names))
            score = self.scorer.evaluate([self.objective_subset])[self.objective_subset].miou
            self.last_seconds = time.perf_counter() - t_start
            self.trial_seconds.append(self.last_seconds)
        if not math.isfinite(score):
            raise SoupError(
                f"the {self.objective_subset} split gives no mIoU (no labelled pixels); use more images"
            )
        return score

    def evaluate_version(
        self, model_name: str, version: Any, ingredients: Sequence[IngredientRef]
    ) -> dict[str, ConditionTable]:
        """Every split's table of a registered version: an ingredient's own,
        else the version loaded on the scoring device and scored."""
        same = next((i for i, ing in enumerate(ingredients) if ing.version == str(version.version)), None)
        if same is not None:
            return self.evaluate(self.one_hot(same))
        from uda.registry import load_segmentor

        model, _ = load_segmentor(f"models:/{model_name}/{version.version}", device=self.device)
        return self.scorer.evaluate(self.report_subsets, model, union=_UNION)
