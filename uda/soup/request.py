"""The soup step's request: its parameters checked together and against the preset, before the registry.

:func:`make_request` turns the entry point's parameters and the resolved
config into a :class:`SoupRequest`: weights syntax, method, objective,
trials, sampler, promotion mode and tuning fraction are validated here, so a
bad value fails before anything is read from the registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uda.data.paths import EMBEDDED_ROOT
from uda.registry.names import DEFAULT_TEACHER_URI, STUDENT_MODEL_NAME

from .mixing import SoupError, parse_weights

__all__ = ["METHODS", "OBJECTIVES", "PROMOTE_CHOICES", "SoupRequest", "make_request"]

METHODS = ("optuna", "greedy", "uniform")
OBJECTIVES = ("miou", "teacher-agreement")
PROMOTE_CHOICES = ("true", "false", "if-better")
#: How ``-P weights`` asks for searched weights instead of fixed ones.
_SEARCH_WORDS = ("", "optuna", "auto")


@dataclass(frozen=True)
class SoupRequest:
    """A validated soup request (nothing in it has touched the registry).

    Attributes:
        model_name: Registered model holding the ingredients (and the soup).
        aliases: Aliases given explicitly (``-P aliases``), or None for the
            preset's, else the latest distill run's last three checkpoints.
        preset_aliases: The preset's ``soup.aliases``.
        weights: Fixed weights as typed (``"3,3,4"``), or None to choose them
            with ``method``.
        method: ``'fixed'`` (weights given), ``'optuna'``, ``'greedy'`` or
            ``'uniform'``.
        trials: Optuna trials (total in the study).
        sampler: Optuna sampler, ``'tpe'`` or ``'qmc'``.
        objective: ``'miou'`` (tuning split of target val) or
            ``'teacher-agreement'`` (label-free).
        tune_fraction: Share of target val (per condition) for tuning.
        promote: ``'true'``, ``'false'`` or ``'if-better'``.
        teacher: Teacher model URI for ``teacher-agreement``.
        seed: Sampler seed.
        study_storage: Optuna storage URL (None: :func:`~uda.soup.study.default_study_storage`).
        target_root: ACDC root.
        conditions: Target conditions.
        img_scale: Test resize ``(width, height)``.
        preset: Preset name (tag of the soup version).
    """

    model_name: str
    aliases: tuple | None
    preset_aliases: tuple
    weights: str | None
    method: str
    trials: int
    sampler: str
    objective: str
    tune_fraction: float
    promote: str
    teacher: str
    seed: int
    study_storage: str | None
    target_root: Path
    conditions: tuple | None
    img_scale: tuple | None
    preset: str | None = None


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def make_request(
    cfg: Mapping[str, Any],
    model_name: str = STUDENT_MODEL_NAME,
    aliases: Sequence[str] | str | None = None,
    weights: str | None = None,
    method: str | None = None,
    trials: int | None = None,
    objective: str | None = None,
    promote: str = "true",
    teacher: str = DEFAULT_TEACHER_URI,
    study_storage: str | None = None,
) -> SoupRequest:
    """Validates the soup parameters against each other and the preset.

    Explicit arguments win over the preset's ``soup`` section
    (``aliases``, ``method``, ``trials``, ``sampler``, ``objective``,
    ``tune_fraction``); ``None``/empty means "the preset's".

    Args:
        cfg: Resolved config (preset + overrides).
        model_name: Registered model name.
        aliases: Ingredient aliases, a list or ``"iter-40,iter-80"``.
        weights: ``"3,3,4"`` (fixed, normalised), or ``""``/``"optuna"`` to
            choose them with ``method``.
        method: ``optuna``, ``greedy`` or ``uniform``.
        trials: Optuna trials (>= 1).
        objective: ``miou`` or ``teacher-agreement``.
        promote: ``true``, ``false`` or ``if-better``.
        teacher: Teacher URI for ``teacher-agreement``.
        study_storage: Optuna storage: a file path or an RDB URL.

    Raises:
        SoupError: for any inconsistent or malformed value (before anything
            is read from the registry).
        RegistryError: a model name or alias MLflow does not allow.
    """
    from uda.registry import validate_alias, validate_model_name

    soup_cfg = dict(cfg.get("soup") or {})
    # MLflow's rules for names and aliases (one owner: uda.registry).
    model_name = validate_model_name(model_name, "model_name")
    if isinstance(aliases, str):
        aliases = _split_list(aliases)
    explicit = tuple(validate_alias(a, "aliases") for a in aliases or () if a.strip()) or None
    if explicit is not None:
        duplicates = sorted({a for a in explicit if explicit.count(a) > 1})
        if duplicates:
            raise SoupError(
                f"alias(es) {', '.join(duplicates)} given twice in "
                f"aliases={','.join(explicit)}; name each "
                "ingredient once (weights say how much of it)"
            )
        if len(explicit) < 2:
            raise SoupError(f"a soup needs at least 2 ingredients, got aliases={','.join(explicit)}")

    fixed: str | None = None
    weights_text = (weights or "").strip()
    if weights_text.lower() not in _SEARCH_WORDS:
        # Syntax, signs and zeros now; the count once the ingredients are
        # known (still before anything is registered).
        count = len(weights_text.split(","))
        parse_weights(weights_text, count)
        if explicit is not None:
            parse_weights(weights_text, len(explicit))
        fixed = weights_text

    chosen_method = (method or "").strip().lower() or None
    if chosen_method is not None and chosen_method not in METHODS:
        raise SoupError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if fixed is not None and chosen_method is not None:
        raise SoupError(
            f"weights={fixed} fixes the weights, method="
            f"{chosen_method} chooses them; give one of the two "
            "(weights=optuna to let the method choose)"
        )
    if fixed is not None:
        chosen_method = "fixed"
    elif chosen_method is None:
        chosen_method = str(soup_cfg.get("method", "optuna")).lower()
        if chosen_method not in METHODS:
            raise SoupError(
                f"soup.method of the preset must be one of {', '.join(METHODS)}, got {chosen_method!r}"
            )

    n_trials = int(trials if trials is not None else soup_cfg.get("trials", 1))
    if n_trials < 1:
        raise SoupError(f"trials must be at least 1, got {n_trials}")
    sampler = str(soup_cfg.get("sampler", "tpe")).lower()
    if sampler not in ("tpe", "qmc"):
        raise SoupError(f"soup.sampler must be 'tpe' or 'qmc', got {sampler!r}")
    chosen_objective = (objective or "").strip().lower() or str(soup_cfg.get("objective", "miou")).lower()
    if chosen_objective not in OBJECTIVES:
        raise SoupError(f"objective must be one of {', '.join(OBJECTIVES)}, got {chosen_objective!r}")
    promote_text = str(promote).strip().lower()
    promote_text = {
        "1": "true",
        "yes": "true",
        "on": "true",
        "0": "false",
        "no": "false",
        "off": "false",
    }.get(promote_text, promote_text)
    if promote_text not in PROMOTE_CHOICES:
        raise SoupError(f"promote must be one of {', '.join(PROMOTE_CHOICES)}, got {promote!r}")
    tune_fraction = float(soup_cfg.get("tune_fraction", 0.5))
    if not 0.0 < tune_fraction < 1.0:
        raise SoupError(f"soup.tune_fraction must lie strictly between 0 and 1, got {tune_fraction}")
    if chosen_objective == "teacher-agreement" and not str(teacher).strip():
        raise SoupError(
            f"objective=teacher-agreement needs a teacher model URI (-P teacher={DEFAULT_TEACHER_URI})"
        )
    target = dict((cfg.get("data") or {}).get("target") or {})
    img_scale = target.get("img_scale")
    conditions = target.get("conditions")
    return SoupRequest(
        model_name=model_name,
        aliases=explicit,
        preset_aliases=tuple(soup_cfg.get("aliases") or ()),
        weights=fixed,
        method=chosen_method,
        trials=n_trials,
        sampler=sampler,
        objective=chosen_objective,
        tune_fraction=tune_fraction,
        promote=promote_text,
        teacher=str(teacher).strip(),
        seed=int(cfg.get("seed", 0) or 0),
        study_storage=(study_storage or "").strip() or None,
        target_root=Path(target.get("root") or EMBEDDED_ROOT / "acdc"),
        conditions=tuple(conditions) if conditions else None,
        img_scale=tuple(img_scale) if img_scale else None,
        preset=cfg.get("name"),
    )
