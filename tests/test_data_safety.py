"""A user's dataset folders are only ever read.

Real-looking roots (Cityscapes and ACDC layouts, written by the generator and
then stripped of its marker, as a user's own copy would be) get sentinel
files, inside the roots and in a sibling folder. Every entry point runs with
every combination of real and default roots; afterwards the whole tree of the
user's folder must be identical, byte for byte: no file changed, added or
removed (the old bug replaced ``<parent of source_root>/{cityscapes,acdc}``
with synthetic data when either root was the default one).

The combinations run through ``main``, which starts ``teacher``, ``distill``,
``soup`` and ``evaluate`` as ``mlflow run`` child runs with the same roots:

========  ============  ============
 source    target       entry points
========  ============  ============
 real      real          main, teacher, distill, soup, evaluate
 real      default       main, teacher, distill, soup, evaluate
 default   real          main, teacher, distill, soup, evaluate
 default   default       main, teacher, distill, soup, evaluate
========  ============  ============
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from budgets import TINY_TRAINING_OPTIONS
from uda.data import rcs
from uda.data.layouts import DatasetLayoutError, scan_cityscapes
from uda.data.roots import EMBEDDED_ROOT, classify_root, prepare_roots, stats_dir
from uda.data.synthetic import (GENERATED_MARKER, NotGeneratedError, SyntheticConfig,
                                ensure_embedded, generate, is_generated)
from uda.data.synthetic import main as synthetic_main

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
EXPERIMENT = 'data-safety'

USER_DATA = SyntheticConfig(seed=7, num_source_train=12, num_source_val=2, num_target_train=1,
                            num_target_val=2, num_target_test=1, source_size=(256, 128),
                            target_size=(128, 72))
SENTINELS = {
    'cityscapes/SENTINEL.bin': os.urandom(4096),
    'cityscapes/gtFine/train/README-user.txt': b'my labels, converted by hand\n',
    'acdc/SENTINEL.bin': os.urandom(4096),
    'acdc/rgb_anon/fog/notes.txt': b'do not delete\n',
    'other-project/SENTINEL.bin': os.urandom(1024),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content digest."""
    tree = {}
    for path in sorted(root.rglob('*')):
        rel = path.relative_to(root).as_posix()
        tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else 'dir'
    return tree


def make_user_data(folder: Path) -> Path:
    """A user's Cityscapes + ACDC: real layouts, no generator marker, no RCS cache."""
    generated = folder.parent / f'{folder.name}-generated'
    generate(generated, USER_DATA)
    shutil.copytree(generated, folder)
    shutil.rmtree(generated)
    for name in ('cityscapes', 'acdc'):
        (folder / name / GENERATED_MARKER).unlink()
    for name in (rcs.STATS_FILE, rcs.STATS_DICT_FILE, rcs.SAMPLES_WITH_CLASS_FILE):
        (folder / 'cityscapes' / name).unlink()
    for rel, data in SENTINELS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    assert not is_generated(folder / 'cityscapes') and not is_generated(folder / 'acdc')
    return folder


@pytest.fixture(scope='module')
def user_data(tmp_path_factory):
    folder = make_user_data(tmp_path_factory.mktemp('user') / 'data')
    return folder, snapshot(folder)


# ----------------------------------------------------------------------
# The rule, on the library functions (fast)
# ----------------------------------------------------------------------
def test_roots_are_classified_one_by_one(user_data, monkeypatch):
    folder, _ = user_data
    assert classify_root(EMBEDDED_ROOT / 'cityscapes', 'cityscapes').embedded
    assert classify_root(EMBEDDED_ROOT / 'acdc', 'acdc').embedded
    assert not classify_root(folder / 'cityscapes', 'cityscapes').embedded
    # the embedded root is fixed by the project, whatever the working directory
    monkeypatch.chdir(folder)
    assert EMBEDDED_ROOT == PROJECT_ROOT / 'data' / 'embedded'
    assert not classify_root('cityscapes', 'cityscapes').embedded
    assert classify_root(PROJECT_ROOT / 'data' / 'embedded' / '..' / 'embedded' / 'acdc', 'acdc').embedded


def test_real_roots_are_only_read(user_data, tmp_path, monkeypatch):
    folder, before = user_data
    monkeypatch.setenv('UDA_CACHE_DIR', str(tmp_path / 'cache'))
    assert prepare_roots(folder / 'cityscapes', folder / 'acdc') is None
    # rare-class statistics of a user's root go to the project cache
    samples = scan_cityscapes(folder / 'cityscapes', 'train')
    counts = rcs.load_or_compute_class_counts(samples, folder / 'cityscapes',
                                              write_dir=stats_dir(folder / 'cityscapes'))
    cached = stats_dir(folder / 'cityscapes')
    assert cached.is_relative_to(tmp_path / 'cache' / 'rcs')
    assert (cached / rcs.STATS_FILE).is_file() and counts.shape == (12, 19)
    assert snapshot(folder) == before


def test_mic_statistics_in_a_user_root_are_reused_not_rewritten(tmp_path, monkeypatch):
    folder = make_user_data(tmp_path / 'data')
    cityscapes = folder / 'cityscapes'
    samples = scan_cityscapes(cityscapes, 'train')
    # A MIC user's own file (only the main one, as MIC's converter writes it).
    rcs.load_or_compute_class_counts(samples, tmp_path / 'mic', write_dir=tmp_path / 'mic')
    shutil.copy2(tmp_path / 'mic' / rcs.STATS_FILE, cityscapes / rcs.STATS_FILE)
    before = snapshot(folder)
    monkeypatch.setenv('UDA_CACHE_DIR', str(tmp_path / 'cache'))
    rcs.load_or_compute_class_counts(samples, cityscapes, write_dir=stats_dir(cityscapes))
    assert snapshot(folder) == before
    assert not (tmp_path / 'cache').exists()  # nothing needed computing


def test_a_missing_real_root_fails_before_anything_is_written(tmp_path):
    with pytest.raises(DatasetLayoutError, match='does not exist') as err:
        prepare_roots(tmp_path / 'nowhere' / 'cityscapes', EMBEDDED_ROOT / 'acdc')
    assert 'source root' in str(err.value)
    assert not (tmp_path / 'nowhere').exists()


def test_mixed_roots_warn_that_one_side_is_synthetic(user_data, caplog):
    folder, before = user_data
    with caplog.at_level('WARNING', logger='uda.data.roots'):
        embedded = prepare_roots(folder / 'cityscapes', EMBEDDED_ROOT / 'acdc', progress=False)
    assert embedded is not None and embedded.acdc_root == EMBEDDED_ROOT / 'acdc'
    assert 'embedded synthetic ACDC' in caplog.text and 'Pass target_root' in caplog.text
    assert snapshot(folder) == before


def test_generator_refuses_folders_it_did_not_create(user_data, tmp_path):
    folder, before = user_data
    with pytest.raises(NotGeneratedError, match='did not create'):
        ensure_embedded(folder, num_source_train=1)
    with pytest.raises(NotGeneratedError, match='Nothing was changed'):
        generate(folder, USER_DATA)
    assert synthetic_main(['--root', str(folder), '--force']) == 2
    assert snapshot(folder) == before

    # one foreign file in an otherwise generated copy is enough to refuse
    small = dict(num_source_train=1, num_source_val=1, num_target_train=1, num_target_val=1,
                 num_target_test=0, conditions=('fog',), source_size=(64, 32), target_size=(64, 36))
    ensure_embedded(tmp_path, **small)
    assert ensure_embedded(tmp_path, force=True, **small)  # its own output: replaced
    (tmp_path / 'acdc' / GENERATED_MARKER).unlink()
    (tmp_path / 'acdc' / 'mine.txt').write_text('user file')
    with pytest.raises(NotGeneratedError):
        ensure_embedded(tmp_path, **dict(small, seed=3))
    assert (tmp_path / 'acdc' / 'mine.txt').read_text() == 'user file'


def test_a_symlinked_embedded_folder_is_refused(user_data, tmp_path):
    folder, before = user_data
    (tmp_path / 'cityscapes').symlink_to(folder / 'cityscapes')
    with pytest.raises(NotGeneratedError):
        ensure_embedded(tmp_path, num_source_train=1)
    assert snapshot(folder) == before


def test_placeholder_readme_survives_generation(tmp_path):
    (tmp_path / 'acdc').mkdir()
    (tmp_path / 'acdc' / 'README.md').write_text('placeholder\n')
    ensure_embedded(tmp_path, num_source_train=1, num_source_val=1, num_target_train=1,
                    num_target_val=1, num_target_test=0, conditions=('snow',),
                    source_size=(64, 32), target_size=(64, 36))
    assert (tmp_path / 'acdc' / 'README.md').read_text() == 'placeholder\n'
    assert is_generated(tmp_path / 'acdc')


def test_legacy_embedded_copy_is_adopted_then_replaced(tmp_path):
    """A copy written before the marker existed (stamp next to it) is ours."""
    small = dict(num_source_train=1, num_source_val=1, num_target_train=1, num_target_val=1,
                 num_target_test=0, conditions=('rain',), source_size=(64, 32), target_size=(64, 36))
    ensure_embedded(tmp_path, **small)
    for name in ('cityscapes', 'acdc'):
        (tmp_path / name / GENERATED_MARKER).unlink()
    stamp = json.loads((tmp_path / 'embedded.json').read_text())
    del stamp['markers']  # as the earlier release wrote it
    (tmp_path / 'embedded.json').write_text(json.dumps(stamp))
    assert is_generated(tmp_path / 'acdc')  # the stamp says so
    ensure_embedded(tmp_path, **dict(small, seed=5))
    assert json.loads((tmp_path / 'embedded.json').read_text())['params']['seed'] == 5
    assert (tmp_path / 'acdc' / GENERATED_MARKER).is_file()


# ----------------------------------------------------------------------
# Every entry point, every combination of real and default roots
# ----------------------------------------------------------------------
TINY_PIPELINE = ' '.join(TINY_TRAINING_OPTIONS + [
    'runner.max_iters=4', 'checkpoint_config.interval=2', 'evaluation.interval=2',
    'log_config.img_interval=2', 'lr_config.warmup_iters=1'])
COMBINATIONS = [('real', 'real'), ('real', 'default'), ('default', 'real'), ('default', 'default')]


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    ensure_embedded(EMBEDDED_ROOT)
    root = tmp_path_factory.mktemp('safety-store')
    uri = f'sqlite:///{root / "mlflow.db"}'
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT,
                                               artifact_location=(root / 'mlruns').as_uri())
    return {'root': root, 'uri': uri, 'cache': root / 'cache'}


@pytest.mark.slow
@pytest.mark.parametrize('source,target', COMBINATIONS, ids=[f'{s}-{t}' for s, t in COMBINATIONS])
def test_every_entry_point_leaves_real_roots_untouched(user_data, store, source, target):
    folder, before = user_data
    roots = {'source_root': folder / 'cityscapes' if source == 'real' else None,
             'target_root': folder / 'acdc' if target == 'real' else None}
    env = {**os.environ, 'MLFLOW_TRACKING_URI': store['uri'], 'MLFLOW_DISABLE_TELEMETRY': 'true',
           'UDA_CACHE_DIR': str(store['cache']), 'MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR': 'false',
           'PATH': f'{VENV_BIN}{os.pathsep}{os.environ["PATH"]}'}
    for name in ('MLFLOW_RUN_ID', 'MLFLOW_EXPERIMENT_ID', 'MLFLOW_EXPERIMENT_NAME'):
        env.pop(name, None)
    # `mlflow run .` from the project folder, leaving a default root unset, as a user does.
    cmd = [str(VENV_BIN / 'mlflow'), 'run', str(PROJECT_ROOT), '--env-manager', 'local',
           '--experiment-name', EXPERIMENT, '-P', f'cfg_options={TINY_PIPELINE}',
           '-P', 'soup_trials=2']
    cmd += [arg for key, root in roots.items() if root is not None for arg in ('-P', f'{key}={root}')]
    result = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert snapshot(folder) == before

    # every step ran, on the roots it was given
    client = mlflow.MlflowClient(store['uri'])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=['attributes.start_time DESC'])
    main = next(r for r in runs if r.data.tags.get('mlflow.project.entryPoint') == 'main')
    children = {r.data.tags['mlflow.project.entryPoint']: r for r in runs
                if r.data.tags.get('mlflow.parentRunId') == main.info.run_id}
    assert set(children) == {'teacher', 'distill', 'soup', 'evaluate'}
    assert all(r.info.status == 'FINISHED' for r in children.values())
    expected = {side: str(root) if root is not None else str(EMBEDDED_ROOT / name)
                for (side, root), name in zip(roots.items(), ('cityscapes', 'acdc'))}
    for step in ('teacher', 'distill'):
        assert children[step].data.params['source_root'] == expected['source_root']
    for step in ('teacher', 'distill', 'soup', 'evaluate'):
        assert children[step].data.params['target_root'] == expected['target_root']
    for step in ('teacher', 'distill'):
        assert children[step].data.tags['data.cityscapes'] == ('real' if source == 'real' else 'embedded')
    assert children['evaluate'].data.tags['data.acdc'] == ('real' if target == 'real' else 'embedded')
    if (source, target) in (('real', 'default'), ('default', 'real')):
        assert 'Mixing data' in result.stderr
    if source == 'real':  # its rare-class statistics were cached outside it
        assert any(store['cache'].glob(f'rcs/cityscapes-*/{rcs.STATS_FILE}'))
