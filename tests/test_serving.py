"""Serving: the pyfunc segmentation model, its input checks, and a real
``mlflow models serve`` process answering HTTP requests."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from uda.config import load_config
from uda.data.labels import PALETTE
from uda.models import build_segmentor, save_checkpoint
from uda.serving import (MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, SegmentationModel,
                         decode_png, example_image_png, input_frame,
                         serving_signature)

os.environ.setdefault('MLFLOW_DISABLE_TELEMETRY', 'true')
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def student_cfg():
    return load_config('default')['student']['model']


@pytest.fixture(scope='module')
def segmentor():
    torch.manual_seed(0)
    return build_segmentor(student_cfg()).eval()


@pytest.fixture(scope='module')
def checkpoint(segmentor, tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'iter_40.pth'
    return save_checkpoint(path, segmentor, meta={'iteration': 40})


@pytest.fixture(scope='module')
def served(checkpoint):
    return SegmentationModel.from_checkpoint(checkpoint, device='cpu')


def encode(image: Image.Image, fmt: str = 'PNG', **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode('ascii')


def reference_label_map(model, rgb: np.ndarray) -> np.ndarray:
    """Label map computed independently of uda.serving."""
    x = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)
    return logits[0].argmax(0).numpy().astype(np.uint8)


# ------------------------------------------------------------------ predict
def test_label_map_is_the_models_argmax_at_input_size(served, segmentor):
    png = example_image_png(70, 131)  # not a multiple of 8 or of the window
    out = served.predict(None, input_frame(png))
    assert list(out.columns) == ['label_map', 'height', 'width']
    assert (out['height'][0], out['width'][0]) == (70, 131)
    label_map = decode_png(out['label_map'][0])
    assert label_map.dtype == np.uint8 and label_map.shape == (70, 131)
    assert label_map.max() <= 18
    rgb = np.array(Image.open(io.BytesIO(png)).convert('RGB'))
    np.testing.assert_array_equal(label_map,
                                  reference_label_map(segmentor, rgb))
    assert served.test_mode == 'slide'  # the preset's test mode


def test_accepts_jpeg_rgba_gray_raw_bytes_and_data_urls(served):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, np.full((80, 96), 255, np.uint8)]))
    files = [encode(Image.fromarray(rgb), 'JPEG', quality=90),
             encode(rgba), encode(Image.fromarray(rgb[..., 0]))]
    frame = pd.DataFrame({'image': [b64(files[0]), files[1],
                                    'data:image/png;base64,' + b64(files[2])]})
    out = served.predict(None, frame)
    assert len(out) == 3
    for row in range(3):
        assert decode_png(out['label_map'][row]).shape == (80, 96)
    # RGBA drops alpha: same prediction as the RGB image.
    np.testing.assert_array_equal(
        decode_png(out['label_map'][1]),
        decode_png(served.predict(None, input_frame(
            encode(Image.fromarray(rgb))))['label_map'][0]))


def test_colorize_param_and_column(served):
    png = example_image_png(64, 64)
    out = served.predict(None, input_frame(png), params={'colorize': True})
    label_map = decode_png(out['label_map'][0])
    color = decode_png(out['color'][0])
    assert color.shape == (64, 64, 3)
    expected = np.array(PALETTE, dtype=np.uint8)[label_map]
    np.testing.assert_array_equal(color, expected)

    frame = pd.DataFrame({'image': [b64(png), b64(png)],
                          'colorize': [False, True]})
    out = served.predict(None, frame)
    assert out['color'][0] is None
    np.testing.assert_array_equal(decode_png(out['color'][1]), expected)
    assert 'color' not in served.predict(None, input_frame(png)).columns


def _big_png() -> bytes:
    # Solid colour compresses to a few hundred bytes.
    return encode(Image.new('RGB', (MAX_IMAGE_SIDE + 1, 64), (10, 20, 30)))


MALFORMED = {
    'not base64': (pd.DataFrame({'image': ['%%% not base64 %%%']}),
                   'not valid base64'),
    'not an image': (pd.DataFrame({'image': [b64(b'hello, world')]}),
                     'not a PNG or JPEG'),
    'wrong column': (pd.DataFrame({'img': [b64(example_image_png())]}),
                     'column "image"'),
    'no rows': (pd.DataFrame({'image': pd.Series([], dtype=object)}),
                'no image'),
    'too large': (None, f'at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}'),
    'too small': (pd.DataFrame({'image': [b64(encode(
        Image.new('RGB', (MIN_IMAGE_SIDE - 1, 80))))]}),
        f'at least {MIN_IMAGE_SIDE} pixels'),
    'gif': (pd.DataFrame({'image': [b64(encode(
        Image.new('RGB', (80, 80)), 'GIF'))]}), 'format GIF'),
    'truncated png': (pd.DataFrame({'image': [b64(
        encode(Image.fromarray(np.random.default_rng(1).integers(
            0, 255, (80, 80, 3), dtype=np.uint8)))[:400])]}), 'damaged'),
    'number': (pd.DataFrame({'image': [12345]}), 'base64 text'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_input_is_a_400_error(served, case):
    frame, message = MALFORMED[case]
    if frame is None:
        frame = pd.DataFrame({'image': [b64(_big_png())]})
    with pytest.raises(MlflowException) as info:
        served.predict(None, frame)
    assert info.value.error_code == 'INVALID_PARAMETER_VALUE'
    assert info.value.get_http_status_code() == 400
    assert message in info.value.message


def test_bad_row_is_named_and_costs_no_inference(served):
    frame = pd.DataFrame({'image': [b64(example_image_png()), 'AAAA']})
    with pytest.raises(MlflowException, match='Row 1'):
        served.predict(None, frame)


def test_signature_declares_image_and_colorize():
    signature = serving_signature()
    assert signature.inputs.input_names() == ['image', 'colorize']
    assert signature.inputs.inputs[0].type.name == 'string'
    assert signature.inputs.inputs[0].required
    assert not signature.inputs.inputs[1].required
    params = {p.name: p for p in signature.params.params}
    assert params['colorize'].default is False


def test_serving_path_imports_neither_mmcv_nor_mmseg():
    code = ('import sys, uda.serving, uda.models; '
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mmcv', 'mmseg', 'mmengine')); print(bad); "
            'sys.exit(1 if bad else 0)')
    result = subprocess.run([sys.executable, '-c', code], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------- real HTTP server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _post(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else \
        json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=body, headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {'message': text}


def _wait_for_ping(url: str, process: subprocess.Popen, log_path,
                   timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f'mlflow models serve exited with {process.returncode}:'
                        f'\n{log_path.read_text()[-3000:]}')
        try:
            with urllib.request.urlopen(url + '/ping', timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f'server did not answer /ping within {timeout_s:.0f} s:\n'
                f'{log_path.read_text()[-3000:]}')


def test_mlflow_models_serve_answers_and_survives_bad_requests(
        tracking_uri, tmp_path, checkpoint, segmentor):
    import mlflow

    from uda import registry

    experiment = mlflow.create_experiment(
        'serving', artifact_location=str(tmp_path / 'artifacts'))
    with mlflow.start_run(experiment_id=experiment):
        version = registry.log_and_register(checkpoint, 'student',
                                            iteration=40)
    registry.set_alias_safely('student', 'serving', version.version)

    port = _free_port()
    url = f'http://127.0.0.1:{port}'
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri,
               MLFLOW_DISABLE_TELEMETRY='true', UDA_SERVING_DEVICE='cpu',
               PATH=os.path.dirname(sys.executable) + os.pathsep +
               os.environ.get('PATH', ''))
    log_path = tmp_path / 'serve.log'
    with open(log_path, 'wb') as log_file:
        process = subprocess.Popen(
            [sys.executable, '-m', 'mlflow', 'models', 'serve', '-m',
             'models:/student@serving', '--env-manager', 'local', '-p',
             str(port), '-h', '127.0.0.1'],
            cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)  # own process group: uvicorn included
    try:
        _wait_for_ping(url, process, log_path, timeout_s=120)
        png = example_image_png(72, 100)
        good = {'dataframe_split': {'columns': ['image'],
                                    'data': [[b64(png)]]}}
        status, answer = _post(url + '/invocations', good)
        assert status == 200, answer
        row = answer['predictions'][0]
        assert (row['height'], row['width']) == (72, 100)
        label_map = decode_png(row['label_map'])
        rgb = np.array(Image.open(io.BytesIO(png)).convert('RGB'))
        np.testing.assert_array_equal(label_map,
                                      reference_label_map(segmentor, rgb))

        status, answer = _post(url + '/invocations', dict(
            good, params={'colorize': True}))
        assert status == 200 and decode_png(
            answer['predictions'][0]['color']).shape == (72, 100, 3)

        bad_payloads = {
            'not an image': ({'dataframe_split': {
                'columns': ['image'], 'data': [[b64(b'not an image')]]}},
                'not a PNG or JPEG'),
            'wrong column': ({'dataframe_split': {
                'columns': ['picture'], 'data': [[b64(png)]]}},
                "missing inputs ['image']"),
            'empty': ({'dataframe_split': {'columns': ['image'],
                                           'data': []}}, 'no image'),
            'too large': ({'dataframe_split': {
                'columns': ['image'], 'data': [[b64(_big_png())]]}},
                f'at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}'),
            'not json': (b'{"dataframe_split": [', 'valid JSON'),
        }
        for case, (payload, message) in bad_payloads.items():
            status, answer = _post(url + '/invocations', payload)
            assert 400 <= status < 500, (case, status, answer)
            assert answer.get('message'), (case, answer)
            assert message in answer['message'], (case, answer['message'])

        status, answer = _post(url + '/invocations', good)  # still serving
        assert status == 200
        np.testing.assert_array_equal(
            decode_png(answer['predictions'][0]['label_map']), label_map)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
