"""Tests of uda.soup: weights, compatibility, streaming mix, weight search."""

import functools
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from uda.soup import (
    GreedyResult,
    SoupError,
    check_compatible,
    greedy_soup,
    mix_state_dicts,
    normalize_weights,
    optuna_search,
    parse_weights,
    save_study_plots,
    state_dict_spec,
    uniform_weights,
    weights_from_unit_cube,
)

REPO = Path(__file__).resolve().parents[1]


def _model_state(seed: int, dtype=torch.float32):
    """A tiny conv + BN state dict (floating weights, BN stats, int counter)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator).to(dtype),
        "conv.bias": torch.randn(4, generator=generator).to(dtype),
        "bn.running_mean": torch.randn(4, generator=generator).to(dtype),
        "bn.running_var": torch.rand(4, generator=generator).to(dtype) + 0.5,
        "bn.num_batches_tracked": torch.tensor(1000 * (seed + 1)),
    }


# --- weights -----------------------------------------------------------------
def test_parse_weights_normalises():
    assert parse_weights("3,3,4", 3) == [0.3, 0.3, 0.4]
    assert parse_weights(" 1 , 1 ", 2) == [0.5, 0.5]
    assert parse_weights("0.2,0.8,0", 3) == pytest.approx([0.2, 0.8, 0.0])
    assert parse_weights("1e-3,1e-3", 2) == [0.5, 0.5]


@pytest.mark.parametrize(
    "text, match",
    [
        ("3,x,4", r"weight 2 \('x'\) in '3,x,4' is not a number"),
        ("3,-1,4", "weight 2 is negative"),
        ("0,0,0", "all weights are zero"),
        ("3,nan,4", r"weight 2 \('nan'\).*not a finite number"),
        ("3,inf,4", r"weight 2 \('inf'\).*not a finite number"),
        ("3,3", r"got 2 weight\(s\) for 3 ingredient\(s\)"),
        ("1,1,1,1", r"got 4 weight\(s\) for 3 ingredient\(s\)"),
        ("3,,4", r"weight 2 is empty in '3,,4'"),
        ("3,3,", "weight 3 is empty"),
        ("", "no weights given"),
    ],
)
def test_parse_weights_rejects(text, match):
    with pytest.raises(SoupError, match=match):
        parse_weights(text, 3)
    assert issubclass(SoupError, ValueError)


def test_normalize_and_uniform_weights():
    assert normalize_weights([2, 2]) == [0.5, 0.5]
    with pytest.raises(SoupError, match="weight 1 is negative"):
        normalize_weights([-1, 2])
    with pytest.raises(SoupError, match="finite"):
        normalize_weights([float("inf"), 1])
    assert uniform_weights(4) == [0.25] * 4
    with pytest.raises(SoupError):
        uniform_weights(0)


# --- compatibility -------------------------------------------------------------
def test_check_compatible_accepts_specs_and_json():
    a, b = _model_state(0), _model_state(1)
    spec = state_dict_spec(a)
    assert spec["conv.weight"] == ((4, 3, 3, 3), "float32")
    as_json = json.loads(json.dumps(spec))  # e.g. stored with a model version
    assert check_compatible([a, b, as_json]) == spec
    assert check_compatible([lambda: a, lambda: b]) == spec


def _variants():
    base = _model_state(0)
    missing = dict(base)
    del missing["conv.bias"]
    extra = dict(base, **{"head.weight": torch.zeros(2)})
    shape = dict(base, **{"bn.running_mean": torch.zeros(5)})
    dtype = dict(base, **{"conv.bias": torch.zeros(4, dtype=torch.float16)})
    # Several differences: the first (reference key order) must be reported.
    several = dict(base, **{"conv.weight": torch.zeros(1), "head.x": torch.zeros(1)})
    del several["bn.running_var"]
    return base, [
        (missing, r"key 'conv.bias' \(shape \(4,\) float32 in ingredient 0\) is missing"),
        (extra, r"key 'head.weight' \(shape \(2,\) float32\) is not in ingredient 0"),
        (shape, r"key 'bn.running_mean' has shape \(5,\), but \(4,\) in ingredient 0"),
        (dtype, r"key 'conv.bias' has dtype float16, but float32 in ingredient 0"),
        (
            several,
            r"key 'conv.weight' has shape \(1,\), but \(4, 3, 3, 3\) in "
            r"ingredient 0 \(and 2 more difference",
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_mismatch_names_first_difference(case):
    base, variants = _variants()
    bad, match = variants[case]
    names = ["models:/s@iter-24000", "models:/s@iter-32000", "models:/s@iter-40000"]
    for check in (
        lambda: check_compatible([base, base, bad], names),
        lambda: mix_state_dicts([base, base, bad], [1, 1, 1], names),
    ):
        with pytest.raises(SoupError, match=match) as info:
            check()
        # The offending ingredient is the third one, named.
        assert str(info.value).startswith(
            "ingredient 2 (models:/s@iter-40000) does not match ingredient 0 (models:/s@iter-24000)"
        )


def test_first_mismatching_ingredient_is_reported():
    base, variants = _variants()
    with pytest.raises(SoupError, match=r"^ingredient 1 does not match.*conv.bias"):
        mix_state_dicts([base, variants[0][0], variants[2][0]], [1, 1, 1])


def test_non_tensor_entry_is_a_clear_error():
    checkpoint = {"state_dict": _model_state(0), "meta": {}}
    with pytest.raises(SoupError, match="entry 'state_dict' is a dict, not a tensor"):
        check_compatible([checkpoint])
    with pytest.raises(SoupError, match="not a state dict"):
        mix_state_dicts([lambda: [1, 2]], [1])


# --- mixing ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mix_is_weighted_average(dtype):
    states = [_model_state(seed, dtype) for seed in range(3)]
    mixed = mix_state_dicts(states, parse_weights("3,3,4", 3))
    assert list(mixed) == list(states[0])
    for key, tensor in mixed.items():
        assert tensor.dtype == states[0][key].dtype
        if not tensor.is_floating_point():
            continue
        a, b, c = (s[key].float() for s in states)
        expected = (0.3 * a + 0.3 * b + 0.4 * c).to(dtype)
        # Sums are fp32, so only the final cast rounds: equal up to one ulp of
        # the checkpoint's dtype (and fp32 rounding for float32).
        tolerance = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(tensor.float(), expected.float(), rtol=tolerance, atol=1e-6)


def test_float64_accumulates_in_float64():
    states = [{"w": torch.full((3,), 1.0 + i * 1e-12, dtype=torch.float64)} for i in range(3)]
    mixed = mix_state_dicts(states, [1, 1, 1])
    assert mixed["w"].dtype == torch.float64
    assert mixed["w"][0].item() == pytest.approx(1.0 + 1e-12, abs=1e-15)


def test_integer_buffers_come_from_first_contributing_ingredient():
    states = [_model_state(seed) for seed in range(3)]
    mixed = mix_state_dicts(states, [1, 1, 1])
    assert mixed["bn.num_batches_tracked"].dtype == torch.int64
    assert mixed["bn.num_batches_tracked"].item() == 1000
    # A zero weight contributes nothing, not even its counter.
    mixed = mix_state_dicts(states, [0, 1, 1])
    assert mixed["bn.num_batches_tracked"].item() == 2000
    # Not an alias of the input: changing the result leaves the input intact.
    mixed["bn.num_batches_tracked"] += 1
    assert states[1]["bn.num_batches_tracked"].item() == 2000


def test_zero_weight_ignores_nan_and_single_ingredient_is_identity():
    good = _model_state(0)
    broken = {
        k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
        for k, v in _model_state(1).items()
    }
    mixed = mix_state_dicts([good, broken], [1, 0])
    for key in good:
        assert torch.equal(mixed[key], good[key])
        assert mixed[key] is not good[key]


def test_mix_is_deterministic_and_streams_loaders(tmp_path):
    paths = []
    for seed in range(4):
        path = tmp_path / f"ckpt{seed}.pth"
        torch.save(_model_state(seed), path)
        paths.append(path)
    calls = []

    def loader(path):
        calls.append(path.name)
        return torch.load(path, weights_only=True, mmap=True)

    loaders = [functools.partial(loader, p) for p in paths]
    first = mix_state_dicts(loaders, [0.1, 0.2, 0.3, 0.4])
    second = mix_state_dicts(loaders, [0.1, 0.2, 0.3, 0.4])
    in_memory = mix_state_dicts([_model_state(s) for s in range(4)], [1, 2, 3, 4])
    assert calls == [p.name for p in paths] * 2  # one at a time, in order
    for key in first:
        assert torch.equal(first[key], second[key])  # bitwise
        assert torch.equal(first[key], in_memory[key])


def test_bad_weights_for_mix():
    states = [_model_state(0), _model_state(1)]
    with pytest.raises(SoupError, match=r"got 3 weight\(s\) for 2 ingredient"):
        mix_state_dicts(states, [1, 1, 1])
    with pytest.raises(SoupError, match="no ingredients"):
        mix_state_dicts([], [])


_MEMORY_SCRIPT = textwrap.dedent("""
    import functools, json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from uda.soup import mix_state_dicts

    def rss_mb(field):
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(field)

    def reset_peak():
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets VmHWM (peak RSS) to the current RSS

    paths, mode = sys.argv[3:], sys.argv[2]
    load = lambda p: torch.load(p, weights_only=True, mmap=(mode == 'mmap'))
    reset_peak()
    base = rss_mb('VmRSS')
    if mode == 'all_at_once':  # naive reference: every ingredient in memory
        states = [load(p) for p in paths]
        mixed = mix_state_dicts(states, [1.0] * len(paths))
    else:
        mixed = mix_state_dicts([functools.partial(load, p) for p in paths],
                                [1.0] * len(paths))
    print(json.dumps({'peak_mb': rss_mb('VmHWM') - base}))
""")


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak-RSS measurement needs Linux /proc"
)
def test_streaming_peak_memory_is_about_two_models(tmp_path):
    """6 ingredients of ~47 MB: streaming peak ≈ 2 models, naive ≈ 7."""
    sizes = [
        (1024, 4096),
        (2048, 1024),
        (4096,),
        (1536, 1536),
        (512, 2048),
        (640, 640),
        (1024, 1024),
        (768, 1024),
        (256, 1024),
    ]  # like a network
    model_mb = sum(math.prod(s) for s in sizes) * 4 / 2**20
    paths = []
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        state = {
            f"layer{i}.weight": torch.randn(*shape, generator=generator) for i, shape in enumerate(sizes)
        }
        state["bn.num_batches_tracked"] = torch.tensor(seed)
        path = tmp_path / f"ingredient{seed}.pth"
        torch.save(state, path)
        paths.append(str(path))
        del state

    def peak(mode):
        result = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(REPO), mode, *paths],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"] / model_mb

    streaming, streaming_mmap, naive = (peak("stream"), peak("mmap"), peak("all_at_once"))
    print(
        f"model {model_mb:.0f} MB; peak RSS above baseline in models: "
        f"streaming {streaming:.2f}, streaming+mmap {streaming_mmap:.2f}, "
        f"all at once {naive:.2f}"
    )
    # Closer to 2 models (accumulator + one ingredient) than to N = 6.
    assert streaming < 3.0
    assert streaming_mmap < 3.0
    assert naive > 5.5  # the measurement does see N models when they exist


# --- greedy soup ------------------------------------------------------------------
def test_greedy_soup_semantics():
    # Ingredient 2 is best alone; 0 helps it, 1 hurts, 3 ties (strict > rejects).
    scores = [0.60, 0.55, 0.70, 0.50]
    soup_scores = {(2, 0): 0.72, (2, 0, 1): 0.71, (2, 0, 3): 0.72}
    evaluated = []

    def evaluate(indices):
        evaluated.append(list(indices))
        return soup_scores[tuple(indices)]

    result = greedy_soup(scores, evaluate)
    assert isinstance(result, GreedyResult)
    assert evaluated == [[2, 0], [2, 0, 1], [2, 0, 3]]  # sorted by own score
    assert result.indices == [2, 0]
    assert result.weights == [0.5, 0.0, 0.5, 0.0]
    assert result.score == 0.72
    assert [step.accepted for step in result.history] == [True, False, False]


def test_greedy_soup_single_and_bad_inputs():
    result = greedy_soup([0.4], lambda idx: pytest.fail("nothing to evaluate"))
    assert result.indices == [0] and result.weights == [1.0] and result.score == 0.4
    with pytest.raises(SoupError):
        greedy_soup([], lambda idx: 0.0)
    with pytest.raises(SoupError, match="finite"):
        greedy_soup([0.1, float("nan")], lambda idx: 0.0)
    with pytest.raises(SoupError, match="finite"):
        greedy_soup([0.1, 0.2], lambda idx: float("nan"))


# --- Optuna search -------------------------------------------------------------------
def test_weights_from_unit_cube():
    assert weights_from_unit_cube([0.3, 0.3, 0.3]) == uniform_weights(3)
    assert weights_from_unit_cube([0.0, 0.0]) == [0.5, 0.5]
    weights = weights_from_unit_cube([0.1, 0.5, 1.0])
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] < weights[1] < weights[2] and all(w > 0 for w in weights)


TARGET = [0.6, 0.3, 0.1]


def _distance_objective(weights):
    return -math.dist(weights, TARGET)


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
def test_optuna_search_finds_known_optimum(sampler):
    seen = []
    result = optuna_search(
        3,
        _distance_objective,
        trials=40,
        seed=0,
        sampler=sampler,
        on_trial=lambda number, w, s: seen.append((number, w, s)),
    )
    uniform_distance = math.dist(uniform_weights(3), TARGET)
    assert result.n_trials == 40 and len(seen) == 40
    assert [number for number, _, _ in seen] == list(range(40))
    assert seen[0][1] == uniform_weights(3)  # uniform enqueued first
    assert result.uniform_score == pytest.approx(-uniform_distance)
    assert result.score >= result.uniform_score
    assert -result.score < 0.5 * uniform_distance  # really moves towards w*
    assert sum(result.weights) == pytest.approx(1.0)
    assert result.score == max(s for _, _, s in seen)


def test_optuna_search_is_seeded():
    first = optuna_search(3, _distance_objective, trials=8, seed=3)
    second = optuna_search(3, _distance_objective, trials=8, seed=3)
    assert first.weights == second.weights and first.score == second.score


def test_optuna_storage_resume_and_plots(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    numbers = []
    first = optuna_search(
        3,
        _distance_objective,
        trials=4,
        seed=1,
        storage=storage,
        study_name="soup",
        on_trial=lambda n, w, s: numbers.append(n),
    )
    assert numbers == [0, 1, 2, 3]
    resumed = optuna_search(
        3,
        _distance_objective,
        trials=7,
        seed=1,
        storage=storage,
        study_name="soup",
        on_trial=lambda n, w, s: numbers.append(n),
    )
    assert numbers == list(range(7))  # numbering continues, uniform not re-enqueued
    assert resumed.n_trials == 7 and resumed.score >= first.score
    again = optuna_search(3, _distance_objective, trials=7, seed=1, storage=storage, study_name="soup")
    assert again.n_trials == 7 and again.weights == resumed.weights
    assert again.evaluated == [] and resumed.evaluated == [4, 5, 6]

    with pytest.raises(SoupError, match="searches weights of 3 ingredients, but 4"):
        optuna_search(4, _distance_objective, trials=2, storage=storage, study_name="soup")

    written = save_study_plots(resumed.study, tmp_path / "plots")
    assert [p.name for p in written] == ["optuna_history.png", "optuna_importance.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# A search in its own process: waits until all workers are ready (files in
# a folder), then searches the shared study; prints what it did as JSON.
_WORKER = textwrap.dedent("""
    import json, math, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from uda.soup.search import optuna_search
    storage, trials, sleep_s = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ready, workers = Path(sys.argv[5]), int(sys.argv[6])
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < workers:
        time.sleep(0.005)

    def evaluate(weights):
        time.sleep(sleep_s)
        return -math.dist(weights, [0.6, 0.3, 0.1])

    seen = []
    result = optuna_search(3, evaluate, trials=trials, seed=0, storage=storage,
                           study_name='shared',
                           on_trial=lambda n, w, s: seen.append(n) or f'run-{n}')
    print(json.dumps(dict(evaluated=result.evaluated, seen=seen,
                          best=result.trial_number, n=result.n_trials)))
""")


def _workers(tmp_path, storage, trials, sleep_s, count):
    ready = tmp_path / f"ready-{trials}-{count}"
    ready.mkdir()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(REPO),
                storage,
                str(trials),
                str(sleep_s),
                str(ready),
                str(count),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def test_concurrent_searches_run_the_study_total_exactly(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = 12
    procs = _workers(tmp_path, storage, trials, 0.05, 3)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    study = optuna.load_study(study_name="shared", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.number for t in complete) == list(range(trials))
    for trial in study.trials:  # a race loser is never evaluated
        if trial.state != optuna.trial.TrialState.COMPLETE:
            assert trial.state == optuna.trial.TrialState.FAIL
            assert trial.user_attrs["uda.surplus"] is True and not trial.params
    evaluated = [n for r in results for n in r["evaluated"]]
    assert sorted(evaluated) == list(range(trials))  # each trial once
    for result in results:
        assert result["seen"] == result["evaluated"] and result["n"] == trials
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {f"run-{n}" for n in range(trials)}
    # Everyone waited for the others' last trials: one answer.
    assert len({r["best"] for r in results}) == 1
    assert study.trials[0].user_attrs["weights"] == uniform_weights(3)  # queued first
    # Seeded per trial number: the workers did not repeat each other's points.
    assert len({tuple(t.user_attrs["weights"]) for t in complete}) == trials


_QUEUE_WORKER = textwrap.dedent("""
    import json, os, sys, time, warnings
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import optuna
    from uda.soup.study import study_storage
    url, ready, workers, queued = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")  # heartbeats outside optimize(): said once per ask
    study = optuna.load_study(study_name="queue", storage=study_storage(url))
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < workers:
        time.sleep(0.001)
    claimed = []
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial = study.ask()
        if trial.number < queued:  # a queued trial, not a new one
            claimed.append(trial.number)
    print(json.dumps(claimed))
""")


def test_a_queued_trial_is_claimed_by_one_process_only(tmp_path):
    """SQLite ignores Optuna's ``SELECT … FOR UPDATE``: without a write lock
    at the start of each transaction, two processes read the same WAITING
    trial and both run it (about 15 of 100 here). The search's storage takes
    that lock."""
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="queue", storage=url)
    queued = 100
    for number in range(queued):
        study.enqueue_trial({"queued": float(number)})
    ready = tmp_path / "ready"
    ready.mkdir()
    workers = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _QUEUE_WORKER, str(REPO), url, str(ready), str(workers), str(queued)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    claimed = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        claimed += json.loads(out.strip().splitlines()[-1])
    assert sorted(claimed) == list(range(queued))


def test_a_killed_trial_is_failed_and_run_again(tmp_path):
    import optuna

    from uda.soup.study import study_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    (proc,) = _workers(tmp_path, url, 1, 600.0, 1)  # trial 0 never ends
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                running = optuna.load_study(study_name="shared", storage=url).get_trials(
                    states=(optuna.trial.TrialState.RUNNING,)
                )
            except KeyError:  # not created yet
                running = []
            if running:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        assert running, "the worker never started its trial"
        time.sleep(1.0)  # its first heartbeat is written
    finally:
        proc.kill()
        proc.communicate()

    # A new search (seconds of grace for the test): it counts the dead
    # trial while it beats no more, then fails it and runs its uniform
    # weights again.
    messages = []
    result = optuna_search(
        3,
        _distance_objective,
        trials=3,
        storage=study_storage(url, 1, 2),
        study_name="shared",
        notify=messages.append,
    )
    study = optuna.load_study(study_name="shared", storage=url)
    # When the dead trial turns stale (whole-second heartbeat timestamps)
    # decides where its retry lands, so the test checks what holds anyway.
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "FAIL" and len(states) == 4
    complete = [n for n, state in states.items() if state == "COMPLETE"]
    assert complete == [1, 2, 3] and sorted(result.evaluated) == complete
    assert result.n_trials == 3
    assert any(
        study.trials[n].params == study.trials[0].params for n in complete
    )  # the killed uniform trial, run again
    assert result.uniform_score == pytest.approx(_distance_objective(uniform_weights(3)))


def test_a_trial_asked_beyond_the_total_is_not_evaluated(tmp_path, capfd):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = optuna_search(3, _distance_objective, trials=1, storage=storage, study_name="soup")
    assert first.evaluated == [0]
    # Another process holds trial 1 (RUNNING), and trial 2 is queued: with
    # trials=2 the study is full, so trial 2 is asked but never evaluated.
    study = optuna.load_study(study_name="soup", storage=storage)
    study.ask()
    study.enqueue_trial({f"ingredient_{i}": 0.5 for i in range(3)})
    capfd.readouterr()
    messages, evaluated = [], []
    result = optuna_search(
        3,
        _distance_objective,
        trials=2,
        storage=storage,
        study_name="soup",
        notify=messages.append,
        on_trial=lambda n, w, s: evaluated.append(n),
        wait_timeout_s=0.5,
    )
    surplus = study.trials[2]
    assert surplus.state == optuna.trial.TrialState.FAIL
    assert surplus.user_attrs == {"uda.surplus": True} and not surplus.params
    assert result.evaluated == evaluated == [] and result.trial_number == 0
    assert result.running_elsewhere == 1 and result.n_trials == 1
    assert any("Trial 2 was asked at the same moment" in m for m in messages)
    assert any(m.startswith("Stopped waiting: 1 trial(s)") for m in messages)
    assert "Trial 2 failed" not in capfd.readouterr().err  # one line, ours


def test_plots_with_a_single_trial_skip_importance(tmp_path):
    result = optuna_search(2, lambda w: w[0], trials=1)
    with pytest.warns(UserWarning, match="optuna_importance.png: skipped"):
        written = save_study_plots(result.study, tmp_path)
    assert [p.name for p in written] == ["optuna_history.png"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=3, trials=0), "trials must be a positive number"),
        (dict(n=3, trials=-2), "trials must be a positive number"),
        (dict(n=1, trials=5), "at least 2 ingredients"),
        (dict(n=3, trials=5, sampler="grid"), "unknown sampler 'grid'"),
        (dict(n=3, trials=5, storage="notadb://x"), "cannot open Optuna study"),
    ],
)
def test_optuna_search_bad_settings(kwargs, match):
    with pytest.raises(SoupError, match=match):
        optuna_search(evaluate=_distance_objective, **kwargs)


def test_optuna_search_rejects_non_finite_objective():
    with pytest.raises(SoupError, match="must be a finite number"):
        optuna_search(2, lambda w: float("nan"), trials=2)


def test_mixed_state_dict_loads_into_the_module():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)) for _ in range(2)]
    for model in models:  # give BN real statistics and counters
        model.train()(torch.randn(2, 3, 8, 8))
    mixed = mix_state_dicts([m.state_dict() for m in models], [1, 3])
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    target.load_state_dict(mixed, strict=True)
    expected_mean = 0.25 * models[0][1].running_mean + 0.75 * models[1][1].running_mean
    torch.testing.assert_close(target[1].running_mean, expected_mean)
    assert target[1].num_batches_tracked.item() == 1
