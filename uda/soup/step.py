"""The ``soup`` step: registered checkpoints in, a verified soup version out.

Order of operations (:func:`run_soup`), so that bad input changes nothing and
``serving`` never points at an unverified model:

1. **Request** (:func:`make_request`, no registry access): weights syntax,
   method, objective, trials, promote, tuning fraction.
2. **Resolve** the ingredients by alias in the registry
   (:func:`resolve_ingredients`; an unknown alias lists the existing ones) and
   check the number of weights against them.
3. **Check** the architecture: every ingredient's state dict has the same
   keys, shapes and dtypes (:func:`~uda.soup.mixing.check_compatible`; the
   error names the first mismatch).
4. **Choose** the weights: fixed, uniform, greedy soup, or an Optuna study
   (stored in its own SQLite file, one nested MLflow run per trial), scored
   on the *tuning* split of target val or, label-free, by agreement with the
   teacher on target train images (:mod:`uda.soup.scoring`).
5. **Mix** (streaming) and **evaluate** the soup, the uniform soup and every
   ingredient on the tuning split, the disjoint *report* split and full val;
   log the comparison.
6. **Register** the soup as a new version of the same registered model
   (``kind=soup``, ingredient/weight/score tags).
7. **Promote** (:mod:`uda.soup.promotion`): move ``serving`` to it (loaded
   and run first; one move at a time, each recorded on both runs) —
   always, never (``promote=false``) or only if its report-split mIoU beats
   the version serving now (``promote=if-better``).

All metric values are fractions in [0, 1] (:mod:`uda.metrics`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch

from uda.data.paths import EMBEDDED_ROOT

from .mixing import SoupError, check_compatible, mix_state_dicts, parse_weights, uniform_weights
from .promotion import current_serving, promote

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "PROMOTE_CHOICES",
    "DEFAULT_TEACHER",
    "SoupRequest",
    "IngredientRef",
    "SoupResult",
    "make_request",
    "resolve_ingredients",
    "default_study_storage",
    "run_soup",
]

log = logging.getLogger(__name__)

METHODS = ("optuna", "greedy", "uniform")
OBJECTIVES = ("miou", "teacher-agreement")
PROMOTE_CHOICES = ("true", "false", "if-better")
DEFAULT_TEACHER = "models:/cs2acdc-teacher/latest"
#: How ``-P weights`` asks for searched weights instead of fixed ones.
_SEARCH_WORDS = ("", "optuna", "auto")
_NUM_DEFAULT_INGREDIENTS = 3


# --------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------
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
        study_storage: Optuna storage URL (None: :func:`default_study_storage`).
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
    model_name: str = "cs2acdc-student",
    aliases: Sequence[str] | str | None = None,
    weights: str | None = None,
    method: str | None = None,
    trials: int | None = None,
    objective: str | None = None,
    promote: str = "true",
    teacher: str = DEFAULT_TEACHER,
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
            "objective=teacher-agreement needs a teacher model "
            "URI (-P teacher=models:/cs2acdc-teacher/latest)"
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


# --------------------------------------------------------------------------
# Ingredients in the registry
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class IngredientRef:
    """One registered version used as an ingredient.

    Attributes:
        label: How it is named in metrics and tags: its alias (``iter-40``),
            or ``v<version>`` when no alias names it.
        version: Registered version number.
        run_id: Source run (tag ``run_id``).
        iteration: Training iteration (tag ``iteration``), if any.
        model_id: The MLflow 3 logged model behind the version.
    """

    label: str
    version: str
    run_id: str | None = None
    iteration: int | None = None
    model_id: str | None = None

    def uri(self, model_name: str) -> str:
        return f"models:/{model_name}/{self.version}"


def _registered_model(name: str):
    """The registered model, or a RegistryError listing what exists."""
    from uda.registry import get_registered_model

    return get_registered_model(
        name, "Run the distill step first (it registers its checkpoints) or pass -P model_name."
    )


def _iteration(version) -> int | None:
    try:
        return int(version.tags.get("iteration"))
    except (TypeError, ValueError):
        return None


def _latest_run_checkpoints(name: str, aliases: Mapping[str, str]) -> list[IngredientRef]:
    """The last three checkpoints of the newest run that registered any."""
    from uda.registry import find_versions, version_model_id

    checkpoints = [v for v in find_versions(name) if v.tags.get("kind") == "checkpoint"]
    if not checkpoints:
        raise SoupError(
            f"{name!r} has no checkpoint versions (tag kind=checkpoint) to "
            f"make a soup of; run distill first or pass -P aliases=..."
        )
    newest = checkpoints[-1]
    run_id = newest.tags.get("run_id") or newest.run_id
    of_run = [
        v for v in checkpoints if (v.tags.get("run_id") or v.run_id) == run_id and _iteration(v) is not None
    ]
    of_run.sort(key=lambda v: (_iteration(v), int(v.version)))
    chosen = of_run[-_NUM_DEFAULT_INGREDIENTS:]
    by_version = {str(v): a for a, v in sorted(aliases.items())}
    refs = []
    for v in chosen:
        wanted = f"iter-{_iteration(v)}"
        label = (
            wanted
            if str(aliases.get(wanted)) == str(v.version)
            else by_version.get(str(v.version), f"v{v.version}")
        )
        refs.append(IngredientRef(label, str(v.version), run_id, _iteration(v), version_model_id(v)))
    if len(refs) < 2:
        raise SoupError(
            f"the latest run that registered checkpoints of {name!r} "
            f"({run_id}) has {len(refs)} checkpoint(s); a soup needs at "
            "least 2. Pass -P aliases=... to choose them."
        )
    return refs


def resolve_ingredients(request: SoupRequest) -> tuple[list[IngredientRef], str]:
    """The ingredient versions and where their names came from.

    ``-P aliases`` if given (each must exist); else the preset's
    ``soup.aliases`` if they all exist; else the last three checkpoints
    (highest iterations) of the newest run that registered checkpoints of
    the model, whatever the preset.

    Returns:
        ``(ingredients, source)`` with ``source`` one of ``'parameter'``,
        ``'preset'``, ``'latest-run'``.

    Raises:
        RegistryError: unknown model or alias (lists the existing aliases).
        SoupError: no usable checkpoints.
    """
    from uda.registry import resolve_alias, version_model_id

    registered = _registered_model(request.model_name)
    aliases = {a: str(v) for a, v in (registered.aliases or {}).items()}
    if request.aliases is not None:
        names, source = list(request.aliases), "parameter"
    elif request.preset_aliases and all(a in aliases for a in request.preset_aliases):
        names, source = list(request.preset_aliases), "preset"
    else:
        return _latest_run_checkpoints(request.model_name, aliases), "latest-run"
    refs = []
    for alias in names:
        version = resolve_alias(request.model_name, alias)
        refs.append(
            IngredientRef(
                alias,
                str(version.version),
                version.tags.get("run_id") or version.run_id,
                _iteration(version),
                version_model_id(version),
            )
        )
    return refs, source


def _download_checkpoint(model_name: str, version: str, folder: Path) -> Path:
    """Downloads only the checkpoint file (and MLmodel) of a version."""
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from uda.serving import CHECKPOINT_ARTIFACT

    uri = f"models:/{model_name}/{version}"
    folder.mkdir(parents=True, exist_ok=True)
    repo = get_artifact_repository(uri)
    mlmodel = Model.load(repo.download_artifacts("MLmodel", str(folder)))
    entry = ((mlmodel.flavors.get("python_function") or {}).get("artifacts") or {}).get(CHECKPOINT_ARTIFACT)
    if not entry:
        raise SoupError(
            f"{uri} is not a cs2acdc-uda segmentor (no "
            f"{CHECKPOINT_ARTIFACT!r} artifact); it cannot be an "
            "ingredient"
        )
    return Path(repo.download_artifacts(entry["path"], str(folder)))


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    """Memory-mapped read (tensors stay in the page cache, so loading an
    ingredient again for the next trial costs little and the process holds
    about one model at a time); clear errors for damaged files."""
    from uda.models import FORMAT_TAG, read_checkpoint

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # let the careful reader give its clear message
        obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_TAG:
        raise SoupError(f"{path} is not a {FORMAT_TAG} checkpoint")
    return obj


def _state_dict_loader(path: Path) -> Callable[[], Mapping[str, torch.Tensor]]:
    return lambda: _read_checkpoint(path)["state_dict"]


# --------------------------------------------------------------------------
# Optuna storage and study name
# --------------------------------------------------------------------------
def _sqlite_file(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).expanduser().resolve()
    return None


def default_study_storage(tracking_uri: str | None = None) -> str:
    """``sqlite:///<dir>/optuna.db`` next to MLflow's SQLite file, or in the
    working directory when MLflow uses another store (a server)."""
    import mlflow

    tracking = _sqlite_file(tracking_uri or mlflow.get_tracking_uri())
    folder = tracking.parent if tracking is not None else Path.cwd().resolve()
    return f"sqlite:///{folder / 'optuna.db'}"


def _storage_url(text: str | None) -> str:
    import mlflow

    if not text:
        url = default_study_storage()
    elif "://" in text:
        url = text
    else:  # a file path
        path = Path(text).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    study_file = _sqlite_file(url)
    if study_file is not None and study_file == _sqlite_file(mlflow.get_tracking_uri()):
        raise SoupError(
            f"the Optuna study must not live in MLflow's own "
            f"database ({study_file}); use another file, e.g. "
            f"{study_file.parent / 'optuna.db'}"
        )
    if study_file is not None:  # SQLite creates the file, not its folder
        study_file.parent.mkdir(parents=True, exist_ok=True)
    return url


def _study_name(
    request: SoupRequest, ingredients: Sequence[IngredientRef], evaluated: Mapping[str, Any]
) -> str:
    """``<model>:<aliases>:<objective>:seed<seed>:<digest>``; the digest
    covers what else changes the scores (versions, data, split), so a study
    is only resumed when its trials are comparable. The versions' source
    runs are in it too: version numbers start again at 1 in another MLflow
    store, while one Optuna storage (a shared database, or ``optuna.db`` in
    the working directory next to a tracking server) outlives stores."""
    digest = hashlib.sha1(
        json.dumps(
            dict(
                versions=[i.version for i in ingredients], runs=[i.run_id for i in ingredients], **evaluated
            ),
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:8]
    return (
        f"{request.model_name}:{','.join(i.label for i in ingredients)}:"
        f"{request.objective}:seed{request.seed}:{digest}"
    )


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------
@dataclass
class SoupResult:
    """What :func:`run_soup` did.

    Attributes:
        version: The registered soup version (``ModelVersion``).
        ingredients: The ingredients.
        ingredients_source: ``'parameter'``, ``'preset'`` or ``'latest-run'``.
        weights: The soup's normalised weights.
        method: ``fixed``, ``uniform``, ``greedy`` or ``optuna``.
        objective: ``miou`` or ``teacher-agreement``.
        scores: Row name (ingredient label, ``uniform``, ``soup``,
            ``serving``) → ``{'tune': mIoU, 'report': …, 'val': …}`` (and
            ``'agreement'`` for the label-free objective).
        promoted: Whether ``serving`` now points at the soup.
        promote_reason: Why (not).
        seconds_per_trial: Mean wall time of one search trial (mix, load,
            score on the objective split), NaN without a search.
        trials: Search evaluations run in this call (Optuna: the trials
            this run evaluated, 0 when the study already had its total).
        study_name / study_storage: The Optuna study (``optuna`` only).
    """

    version: Any
    ingredients: list[IngredientRef]
    ingredients_source: str
    weights: list[float]
    method: str
    objective: str
    scores: dict[str, dict[str, float]]
    promoted: bool
    promote_reason: str
    seconds_per_trial: float = math.nan
    trials: int = 0
    study_name: str | None = None
    study_storage: str | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)


def _fmt_weights(weights: Sequence[float]) -> str:
    return ",".join(f"{w:.6g}" for w in weights)


def _weights_key(weights: Sequence[float]) -> tuple:
    return tuple(round(float(w), 12) for w in weights)


# --------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------
def run_soup(
    request: SoupRequest, device: str = "cpu", batch_size: int | None = None, work_dir: Path | None = None
) -> SoupResult:
    """Resolve → check → choose weights → mix → evaluate → register →
    promote, inside the active MLflow run.

    Args:
        request: From :func:`make_request`.
        device: Scoring device (``cpu``, ``cuda``).
        batch_size: Images per inference batch (None: by pixel budget, see
            :data:`~uda.soup.scoring.DEFAULT_MAX_BATCH_PIXELS`).
        work_dir: Where ingredient checkpoints are downloaded (default: a
            temporary folder, deleted afterwards).

    Returns:
        A :class:`SoupResult`.

    Raises:
        SoupError / RegistryError / DatasetLayoutError: bad input; nothing
            is registered and ``serving`` is untouched.
    """
    import mlflow

    if mlflow.active_run() is None:
        raise ValueError("run_soup needs an active MLflow run (the soup entry point starts one).")
    from uda.data.roots import prepare_roots

    started = time.perf_counter()
    # A missing root fails before any ingredient is downloaded; only the
    # embedded root is ever written.
    prepare_roots(target_root=request.target_root)
    ingredients, source = resolve_ingredients(request)
    labels = [i.label for i in ingredients]
    n = len(ingredients)
    fixed_weights = None
    if request.weights is not None:
        fixed_weights = parse_weights(request.weights, n)
    elif request.method == "optuna" and n < 2:
        raise SoupError("a weight search needs at least 2 ingredients")
    origin = {
        "parameter": "from -P aliases",
        "preset": "the preset's soup.aliases",
        "latest-run": "the latest run's last checkpoints",
    }[source]
    print(
        f"Soup of {request.model_name}: "
        + ", ".join(f"{i.label} (version {i.version})" for i in ingredients)
        + f" [{origin}]"
    )
    mlflow.set_tags(
        {
            "soup.ingredients": ",".join(labels),
            "soup.ingredient_versions": ",".join(i.version for i in ingredients),
            "soup.ingredients_source": source,
            "soup.method": request.method,
            "soup.objective": request.objective,
        }
    )
    from uda.tracking import log_model_inputs

    log_model_inputs([i.model_id for i in ingredients])  # lineage: ingredients → this run

    with tempfile.TemporaryDirectory(prefix="uda-soup-") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp)
        paths = [
            _download_checkpoint(request.model_name, i.version, folder / f"v{i.version}") for i in ingredients
        ]
        loaders = [_state_dict_loader(p) for p in paths]
        names = [f"models:/{request.model_name}@{i.label} (version {i.version})" for i in ingredients]
        check_compatible(loaders, names)
        return _run_checked(
            request, ingredients, source, paths, loaders, names, fixed_weights, device, batch_size, started
        )


def _run_checked(
    request: SoupRequest,
    ingredients: list[IngredientRef],
    source: str,
    paths: list[Path],
    loaders: list,
    names: list[str],
    fixed_weights: list[float] | None,
    device: str,
    batch_size: int | None,
    started: float,
) -> SoupResult:
    import mlflow

    from uda.data.layouts import scan_acdc
    from uda.models import build_from_checkpoint
    from uda.registry import load_segmentor

    from .scoring import ImageCache, SoupScorer, split_tune_report, stratified_subset

    labels = [i.label for i in ingredients]
    n = len(ingredients)
    parent = mlflow.active_run()
    objective_subset = "tune" if request.objective == "miou" else "agreement"

    # --- data: decoded and normalised once, on the device -----------------
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

    model = build_from_checkpoint(paths[0]).eval().to(device)
    model_cfg = dict(model.model_cfg)
    scorer = SoupScorer(model, cache, num_classes=model.num_classes)
    if request.objective == "teacher-agreement":
        teacher, _ = load_segmentor(request.teacher, device=device)
        scorer.set_pseudo_labels("agreement", teacher)
        del teacher

    report_subsets = ["tune", "report"] + (["agreement"] if objective_subset == "agreement" else [])
    union = {"val": ["tune", "report"]}
    full: dict[tuple, dict[str, Any]] = {}  # weights -> subset -> table

    def evaluate_full(weights: Sequence[float]) -> dict[str, Any]:
        key = _weights_key(weights)
        if key not in full:
            one_hot = [i for i, w in enumerate(key) if w == 1.0]
            if len(one_hot) == 1 and sum(key) == 1.0:
                scorer.load(loaders[one_hot[0]]())
            else:
                scorer.load(mix_state_dicts(loaders, list(weights), names))
            full[key] = scorer.evaluate(report_subsets, union=union)
        return full[key]

    def one_hot(index: int) -> list[float]:
        return [1.0 if i == index else 0.0 for i in range(n)]

    # --- every ingredient on every split (also greedy's own scores) -------
    for index, label in enumerate(labels):
        result = evaluate_full(one_hot(index))
        print(
            f"  {label}: {objective_subset} mIoU "
            f"{result[objective_subset].miou:.4f}, report mIoU "
            f"{result['report'].miou:.4f}"
        )

    # --- choose the weights ------------------------------------------------
    trial_seconds: list[float] = []
    study_name = storage = None
    trials_run: int | None = None  # Optuna: trials evaluated in this run

    last_seconds: list[float | None] = [None]

    def objective(weights: Sequence[float]) -> float:
        """Objective-split mIoU of a mix; timed unless already known."""
        key = _weights_key(weights)
        last_seconds[0] = None
        if key in full:
            score = full[key][objective_subset].miou
        else:
            t_start = time.perf_counter()
            scorer.load(mix_state_dicts(loaders, list(weights), names))
            score = scorer.evaluate([objective_subset])[objective_subset].miou
            last_seconds[0] = time.perf_counter() - t_start
            trial_seconds.append(last_seconds[0])
        if not math.isfinite(score):
            raise SoupError(
                f"the {objective_subset} split gives no mIoU (no labelled pixels); use more images"
            )
        return score

    def log_trial(number: int, weights: Sequence[float], score: float, seconds: float | None) -> str:
        """One nested run per evaluated trial; returns its run id."""
        # The parent's experiment, explicitly: a run resumed through
        # MLFLOW_RUN_ID does not make its experiment the active one.
        with mlflow.start_run(
            run_name=f"trial-{number}", nested=True, experiment_id=parent.info.experiment_id
        ) as run:
            mlflow.set_tags(
                {
                    "soup.trial": str(number),
                    "soup.method": request.method,
                    "entry_point": "soup-trial",
                    **({"soup.study_name": study_name} if study_name else {}),
                }
            )
            mlflow.log_params({f"weight.{label}": f"{w:.6g}" for label, w in zip(labels, weights)})
            metrics = {f"{objective_subset}.mIoU": score, "objective": score}
            if seconds is not None:
                metrics["seconds"] = seconds
            mlflow.log_metrics(metrics)
        mlflow.log_metric(f"trial.{objective_subset}.mIoU", score, step=number)
        print(f"  trial {number}: weights {_fmt_weights(weights)} -> {objective_subset} mIoU {score:.4f}")
        return run.info.run_id

    if request.method == "fixed":
        weights = list(fixed_weights)
    elif request.method == "uniform":
        weights = uniform_weights(n)
    elif request.method == "greedy":
        from .search import greedy_soup

        counter = [0]

        def greedy_evaluate(indices: list[int]) -> float:
            share = [1.0 / len(indices) if i in indices else 0.0 for i in range(n)]
            score = objective(share)
            counter[0] += 1
            log_trial(counter[0], share, score, last_seconds[0])
            return score

        own = [full[_weights_key(one_hot(i))][objective_subset].miou for i in range(n)]
        greedy = greedy_soup(own, greedy_evaluate)
        weights = greedy.weights
        mlflow.log_dict(
            {
                "ingredient_scores": dict(zip(labels, own)),
                "history": [
                    dict(
                        candidate=labels[s.candidate],
                        soup=[labels[i] for i in s.soup],
                        score=s.score,
                        accepted=s.accepted,
                    )
                    for s in greedy.history
                ],
                "chosen": [labels[i] for i in greedy.indices],
            },
            "soup/greedy.json",
        )
    else:
        import optuna

        from .search import optuna_search, redact_url, save_study_plots

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = _storage_url(request.study_storage)
        study_name = _study_name(
            request,
            ingredients,
            dict(
                root=str(Path(root).resolve()),
                split=request.tune_fraction,
                img_scale=request.img_scale,
                conditions=request.conditions,
                objective_images=cache.sizes[objective_subset],
                teacher=request.teacher if objective_subset == "agreement" else None,
            ),
        )
        shown_storage = redact_url(storage)
        mlflow.set_tags({"soup.study_name": study_name, "soup.study_storage": shown_storage})
        print(
            f"Optuna study {study_name!r} in {shown_storage} "
            f"({request.trials} trials, {request.sampler}, seed "
            f"{request.seed})"
        )

        def on_trial(number: int, weights: list[float], score: float) -> str:
            # Logged before Optuna marks the trial complete, so every
            # complete trial this run evaluated has its nested run.
            return log_trial(number, weights, score, last_seconds[0])

        search = optuna_search(
            n,
            objective,
            request.trials,
            seed=request.seed,
            storage=storage,
            study_name=study_name,
            sampler=request.sampler,
            on_trial=on_trial,
            notify=lambda line: print(f"  {line}"),
        )
        weights = search.weights
        searched = trials_run = len(search.evaluated)
        if not searched:
            print(
                f"  The study already has {search.n_trials} completed "
                f"trials (trials={request.trials} is its total): no trial "
                f"run here; the soup uses its best trial "
                f"{search.trial_number} ({objective_subset} mIoU "
                f"{search.score:.4f})."
            )
        elif searched < request.trials:
            print(
                f"  Ran {searched} of the study's {search.n_trials} "
                f"completed trials here (the others ran before or in "
                f"other processes); best: trial {search.trial_number}."
            )
        mlflow.log_metrics(
            {
                "optuna.best_trial": search.trial_number,
                "optuna.completed_trials": search.n_trials,
                "optuna.trials_run_here": searched,
            }
        )
        mlflow.set_tag("soup.trials_run_here", ",".join(str(number) for number in search.evaluated) or "none")
        with tempfile.TemporaryDirectory(prefix="uda-optuna-") as plots:
            for path in save_study_plots(search.study, plots):
                mlflow.log_artifact(str(path), "soup")

    # --- the soup, the uniform soup, the ingredients: same splits ---------
    rows: dict[str, dict[str, Any]] = {}
    for index, ingredient in enumerate(ingredients):
        rows[ingredient.label] = dict(
            version=ingredient.version,
            weights=_fmt_weights(one_hot(index)),
            tables=evaluate_full(one_hot(index)),
        )
    rows["uniform"] = dict(
        version="", weights=_fmt_weights(uniform_weights(n)), tables=evaluate_full(uniform_weights(n))
    )
    # Mixed last, streaming (peak ~2 models), and kept for registering.
    mixed = mix_state_dicts(loaders, weights, names)
    if _weights_key(weights) in full:  # e.g. the uniform soup won
        soup_tables = full[_weights_key(weights)]
    else:
        scorer.load(mixed)
        soup_tables = scorer.evaluate(report_subsets, union=union)
    rows["soup"] = dict(version="(new)", weights=_fmt_weights(weights), tables=soup_tables)

    serving = current_serving(request.model_name)
    if request.promote == "if-better" and serving is not None:
        same = next((i for i, ing in enumerate(ingredients) if ing.version == str(serving.version)), None)
        if same is not None:
            serving_tables = evaluate_full(one_hot(same))
        else:
            serving_model, _ = load_segmentor(
                f"models:/{request.model_name}/{serving.version}", device=device
            )
            serving_tables = scorer.evaluate(report_subsets, serving_model, union=union)
            del serving_model
        rows["serving"] = dict(version=str(serving.version), weights="", tables=serving_tables)

    splits = [objective_subset] if objective_subset == "agreement" else []
    splits += ["tune", "report", "val"]
    scores = {name: {split: row["tables"][split].miou for split in splits} for name, row in rows.items()}
    comparison = _comparison_rows(rows, splits, cache.conditions)
    metrics = {
        f"{split}.mIoU.{name}": value
        for name, row in scores.items()
        for split, value in row.items()
        if math.isfinite(value)
    }
    metrics.update(
        {
            f"report.mIoU.soup.{c}": v
            for c, v in soup_tables["report"].per_condition_miou.items()
            if math.isfinite(v)
        }
    )
    seconds_per_trial = sum(trial_seconds) / len(trial_seconds) if trial_seconds else math.nan
    if trial_seconds:
        metrics["seconds_per_trial"] = seconds_per_trial
    metrics["seconds.cache"] = cache_seconds
    mlflow.log_metrics(metrics)
    _log_comparison(comparison, splits)
    mlflow.log_param("soup.weights", _fmt_weights(weights))

    # --- register, then (maybe) promote -----------------------------------
    from uda.registry import log_and_register

    soup_scores = scores["soup"]
    version = log_and_register(
        mixed,
        request.model_name,
        model_cfg=model_cfg,
        kind="soup",
        alias=None,
        preset=request.preset,
        name="soup",
        metrics={f"{split}_mIoU": round(v, 6) for split, v in soup_scores.items() if math.isfinite(v)},
        extra_tags={
            "soup.ingredients": ",".join(labels),
            "soup.ingredient_versions": ",".join(i.version for i in ingredients),
            "soup.weights": _fmt_weights(weights),
            "soup.method": request.method,
            "soup.objective": request.objective,
            **{f"soup.weight.{label}": f"{w:.6g}" for label, w in zip(labels, weights)},
        },
    )
    del mixed
    mlflow.set_tag("soup.version", str(version.version))

    promotion = promote(
        request.model_name,
        str(version.version),
        mlflow.active_run().info.run_id,
        request.promote,
        soup_scores["report"],
        compared=serving,
        compared_report=scores.get("serving", {}).get("report"),
    )
    promoted, reason = promotion.promoted, promotion.reason
    mlflow.log_metric("seconds.total", time.perf_counter() - started)
    _print_summary(
        request, version, weights, comparison, splits, promotion, seconds_per_trial, len(trial_seconds)
    )
    return SoupResult(
        version=version,
        ingredients=ingredients,
        ingredients_source=source,
        weights=list(weights),
        method=request.method,
        objective=request.objective,
        scores=scores,
        promoted=promoted,
        promote_reason=reason,
        seconds_per_trial=seconds_per_trial,
        trials=(trials_run if trials_run is not None else len(trial_seconds)),
        study_name=study_name,
        study_storage=storage,
        comparison=comparison,
    )


def _comparison_rows(
    rows: Mapping[str, Mapping[str, Any]], splits: Sequence[str], conditions: Sequence[str]
) -> list[dict[str, Any]]:
    table = []
    for name, row in rows.items():
        entry: dict[str, Any] = {"model": name, "version": row["version"], "weights": row["weights"]}
        for split in splits:
            entry[f"{split} mIoU"] = row["tables"][split].miou
        for condition in conditions:
            entry[f"report mIoU {condition}"] = row["tables"]["report"].per_condition_miou.get(condition)
        table.append(entry)
    return table


def _log_comparison(comparison: list[dict[str, Any]], splits: Sequence[str]) -> None:
    import mlflow
    import pandas as pd

    mlflow.log_table(pd.DataFrame(comparison), "soup/comparison.json")
    mlflow.log_text(_markdown(comparison), "soup/comparison.md")


def _markdown(comparison: list[dict[str, Any]]) -> str:
    columns = list(comparison[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in comparison:
        cells = []
        for column in columns:
            value = row[column]
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _print_summary(
    request: SoupRequest,
    version: Any,
    weights: Sequence[float],
    comparison: list[dict[str, Any]],
    splits: Sequence[str],
    promotion: Any,
    seconds_per_trial: float,
    trials: int,
) -> None:
    shown = []
    for row in comparison:
        row = {
            k: v
            for k, v in row.items()
            if k in ("model", "version", "weights") or k in {f"{s} mIoU" for s in splits}
        }
        if row["model"] == "soup":
            row["version"] = str(version.version)
        shown.append(row)
    print(_markdown(shown), end="")
    timing = f"; {seconds_per_trial:.2f} s per trial over {trials} trials" if trials else ""
    print(
        f"Registered {request.model_name} version {version.version} "
        f"(kind=soup, weights {_fmt_weights(weights)}, method "
        f"{request.method}){timing}."
    )
    if promotion.promoted:
        moved = (
            f"moved from version {promotion.serving_before} to {version.version}"
            if promotion.serving_before
            else f"set to version {version.version}"
        )
    else:
        moved = "unchanged"
    print(f"serving: {moved} ({promotion.reason}).")
