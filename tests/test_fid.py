"""fid.py: the Frechet distance against closed forms, statistics against an independent numpy
computation, ref -> calc round trips with a tiny TorchScript detector pickled like NVlabs'
Inception one, folder/zip and 1/2-process identity, downloads, and the one-line errors."""

import http.server
import os
import pickle
import re
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import dnnlib
import fid
from helpers import assert_one_line_error, run_cli, torchrun

pytestmark = pytest.mark.filterwarnings('ignore::FutureWarning')   # torch.jit's deprecation notices


# ----------------------------------------------------------------------------------------------
# Frechet distance and statistics (in process).

def gaussian_closed_form(mu1, s1, mu2, s2):
    """Frechet distance of Gaussians whose covariances are diagonal in one common basis, given
    the eigenvalues s1, s2: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    f = 12
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = rng.uniform(0.1, 3, size=f), rng.uniform(0.1, 3, size=f)
    expected = gaussian_closed_form(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # The same Gaussians in a rotated basis (full, commuting covariance matrices).
    q, _ = np.linalg.qr(rng.normal(size=[f, f]))
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert fid.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-9)


def test_feature_stats_against_numpy_self_zero_and_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=[300, 10]) * rng.uniform(0.5, 2, size=10) + rng.normal(size=10)
    x = torch.from_numpy(x.astype(np.float32))
    stats = fid.FeatureStats()
    for chunk in x.split(64):
        stats.add(chunk)
    mu, sigma = stats.mean_cov()
    xd = x.double().numpy()
    np.testing.assert_allclose(mu, xd.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xd, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # A shifted set has the same covariance: FID = ||shift||^2 exactly.
    shift = torch.from_numpy(rng.normal(size=10).astype(np.float32))
    shifted = fid.FeatureStats()
    shifted.add(x + shift)
    mu2, sigma2 = shifted.mean_cov()
    expected = float(np.sum((mu2 - mu) ** 2))
    assert expected == pytest.approx(float(np.sum(shift.double().numpy() ** 2)), rel=1e-5)
    assert fid.frechet_distance(mu2, sigma2, mu, sigma) == pytest.approx(expected, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# A tiny detector in the form of NVlabs' Inception pickle: a TorchScript module, called as
# detector(uint8 NCHW, return_features=True) -> [N, F], that plain pickle.load returns.

class TinyDetector(torch.nn.Module):
    def __init__(self, num_features=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 2 * 2, num_features, generator=g))

    def forward(self, x, return_features: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 2).flatten(1)
        feats = torch.sin(3 * x @ self.proj)
        if return_features:
            return feats
        return feats.softmax(dim=1)


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    path = tmp_path_factory.mktemp('det') / 'tiny-detector.pkl'
    fid.save_detector(torch.jit.script(TinyDetector()), str(path))
    return path


def test_detector_pickle_is_plain_torchscript(detector):
    with open(detector, 'rb') as f:
        net = pickle.load(f)
    assert isinstance(net, torch.jit.ScriptModule)
    x = torch.randint(0, 256, [2, 3, 5, 5], dtype=torch.uint8)
    assert net(x, return_features=True).shape == (2, 6)


def make_images(folder, n, size=(7, 5), seed=0, gray=(), jpg=()):
    """n random images, alternating between folder and folder/sub (a tree); indices in `gray`
    are grayscale, those in `jpg` JPEG. Returns {relative name: RGB uint8 HWC array as decoded}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rel = f'{"sub/" if i % 3 == 1 else ""}{i:06d}.{"jpg" if i in jpg else "png"}'
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if i in gray:
            Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), 'L').save(path)
        else:
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        out[rel] = np.asarray(Image.open(path).convert('RGB'))
    return out


def independent_stats(detector_path, arrays, batch):
    """mu, sigma computed here from the decoded images with numpy's mean and unbiased covariance
    in float64. The detector sees the same batches as fid.py's (float32 results can depend on
    the batch in the last bit), so the two must agree to float64 rounding."""
    with open(detector_path, 'rb') as f:
        net = pickle.load(f)
    x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        feats = torch.cat([net(chunk, return_features=True) for chunk in x.split(batch)]).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False, ddof=1)


def last_float(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return float(result.stdout.strip().splitlines()[-1])


def load_npz(path):
    with np.load(path) as d:
        return d['mu'], d['sigma']


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def fid_here(capsys, *args):
    """fid.py's command line run in this process (a subprocess costs seconds of torch import);
    the subprocess runs below cover the real entry point."""
    capsys.readouterr()
    try:
        # On the CPU like the independent computations here, also on a machine with a GPU.
        dnnlib.run_cli(fid.main, [str(a) for a in args] + ['--device=cpu'])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def test_ref_then_calc_round_trip_and_independent_stats(tmp_path, detector, capsys):
    a = make_images(tmp_path / 'a', 14, gray={2, 5}, jpg={3})
    ref = tmp_path / 'refs' / 'a.npz'
    r = run_cli('fid.py', 'ref', f'--data={tmp_path / "a"}', f'--dest={ref}', f'--detector={detector}', '--batch=4', '--device=cpu')
    assert r.returncode == 0, r.stderr
    assert re.search(r'Features: 100%.*\b4/4 ', r.stdout), r.stdout     # feature extraction shows progress
    mu, sigma = load_npz(ref)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (6, 6)
    mu_i, sigma_i = independent_stats(detector, [a[k] for k in sorted(a)], batch=4)
    np.testing.assert_allclose(mu, mu_i, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sigma, sigma_i, rtol=0, atol=1e-10)

    # calc on the same images: FID ~ 0 (workers > 0 on this run).
    r = fid_here(capsys, 'calc', f'--images={tmp_path / "a"}', f'--ref={ref}', f'--detector={detector}', '--workers=2')
    assert abs(last_float(r)) < 1e-6

    # Another set against it: the printed FID is the distance of the independent statistics.
    b = make_images(tmp_path / 'b', 9, seed=7)
    mu_b, sigma_b = independent_stats(detector, [b[k] for k in sorted(b)], batch=2)
    expected = fid.frechet_distance(mu_b, sigma_b, mu_i, sigma_i)
    r = fid_here(capsys, 'calc', f'--images={tmp_path / "b"}', f'--ref={ref}', f'--detector={detector}', '--batch=2')
    assert expected > 0.01
    assert last_float(r) == pytest.approx(expected, rel=1e-5)    # printed with 6 significant digits


def test_num_picks_edm_subset(tmp_path, detector, capsys):
    a = make_images(tmp_path / 'a', 12)
    names = sorted(a)
    idx = np.arange(12)
    np.random.RandomState(5).shuffle(idx)          # EDM's rule: shuffle, first --num, sorted
    chosen = [a[names[i]] for i in np.sort(idx[:7])]
    dest = tmp_path / 's.npz'
    r = fid_here(capsys, 'ref', f'--data={tmp_path / "a"}', f'--dest={dest}', f'--detector={detector}',
                 '--num=7', '--seed=5', '--workers=0')
    assert r.returncode == 0, r.stderr
    mu, sigma = load_npz(dest)
    mu_i, sigma_i = independent_stats(detector, chosen, batch=64)
    np.testing.assert_allclose(mu, mu_i, atol=1e-10)
    np.testing.assert_allclose(sigma, sigma_i, atol=1e-10)


def test_zip_folder_and_process_count_give_identical_stats(tmp_path, detector, capsys):
    make_images(tmp_path / 'imgs', 11, gray={4})
    archive = tmp_path / 'imgs.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for root, _, files in os.walk(tmp_path / 'imgs'):
            for f in sorted(files):
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, tmp_path / 'imgs'))
    common = [f'--detector={detector}', '--batch=3', '--workers=0']
    r = fid_here(capsys, 'ref', f'--data={tmp_path / "imgs"}', f'--dest={tmp_path / "dir.npz"}', *common)
    assert r.returncode == 0, r.stderr
    r = fid_here(capsys, 'ref', f'--data={archive}', f'--dest={tmp_path / "zip.npz"}', *common)
    assert r.returncode == 0, r.stderr
    # 4 batches of 3, 3, 3, 2 images over 2 processes; the zip on 2 processes as well.
    r = torchrun('fid.py', 2, 'ref', f'--data={archive}', f'--dest={tmp_path / "two.npz"}', *common, '--device=cpu')
    assert r.returncode == 0, r.stdout + r.stderr
    ref = load_npz(tmp_path / 'dir.npz')
    for other in ('zip.npz', 'two.npz'):
        got = load_npz(tmp_path / other)
        assert np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]), other


# ----------------------------------------------------------------------------------------------
# Downloads: a local HTTP server stands in for the NGC / EDM URLs.

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / 'www'
    root.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)   # noqa: E731
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{httpd.server_address[1]}', httpd
    httpd.shutdown()
    httpd.server_close()


def test_detector_and_ref_download_once_into_cache(tmp_path, detector, server, capsys, monkeypatch):
    root, url, httpd = server
    make_images(tmp_path / 'imgs', 5)
    (root / 'metrics').mkdir()
    (root / 'metrics' / 'inception-2015-12-05.pkl').write_bytes(detector.read_bytes())
    r = fid_here(capsys, 'ref', f'--data={tmp_path / "imgs"}', f'--dest={root / "ref.npz"}',
                 f'--detector={detector}', '--workers=0')
    assert r.returncode == 0, r.stderr
    cache = tmp_path / 'cache'
    monkeypatch.setenv('GITS_CACHE_DIR', str(cache))
    args = ['calc', f'--images={tmp_path / "imgs"}', f'--ref={url}/ref.npz',
            f'--detector={url}/metrics/inception-2015-12-05.pkl?download=1', '--workers=0']
    assert abs(last_float(fid_here(capsys, *args))) < 1e-6
    assert sorted(os.listdir(cache / 'metrics')) == ['inception-2015-12-05.pkl', 'ref.npz']   # no partial files
    assert (cache / 'metrics' / 'inception-2015-12-05.pkl').read_bytes() == detector.read_bytes()
    httpd.shutdown()                                      # offline now: the cache must suffice
    httpd.server_close()
    assert abs(last_float(fid_here(capsys, *args))) < 1e-6
    r = fid_here(capsys, 'calc', f'--images={tmp_path / "imgs"}', f'--ref={url}/other.npz', '--workers=0')
    assert_one_line_error(r, '--ref')
    assert 'download' in r.stderr and str(cache) in r.stderr


def test_default_detector_is_nvlabs_inception():
    assert fid.DETECTOR_URL == ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/'
                                'files/metrics/inception-2015-12-05.pkl')
    assert fid.cache_dir().endswith(os.path.join('gits', 'metrics')) or 'GITS_CACHE_DIR' in os.environ


# ----------------------------------------------------------------------------------------------
# One-line errors.

def test_errors(tmp_path, detector, capsys):
    make_images(tmp_path / 'ok', 4)
    ref = tmp_path / 'ok.npz'
    assert fid_here(capsys, 'ref', f'--data={tmp_path / "ok"}', f'--dest={ref}', f'--detector={detector}',
                    '--workers=0').returncode == 0
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('no images here')
    make_images(tmp_path / 'mixed', 3)
    Image.new('RGB', (9, 9)).save(tmp_path / 'mixed' / '000009.png')
    np.savez(tmp_path / 'nomu.npz', mean=np.zeros(6), cov=np.eye(6))
    np.savez(tmp_path / 'dim.npz', mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / 'bad.pkl').write_bytes(b'not a pickle')
    calc = ['calc', f'--detector={detector}', '--workers=0']
    cases = [
        ([*calc, f'--images={tmp_path / "empty"}', f'--ref={ref}'], '--images'),
        ([*calc, f'--images={tmp_path / "missing"}', f'--ref={ref}'], '--images'),
        ([*calc, f'--images={tmp_path / "mixed"}', f'--ref={ref}'], '--images'),
        ([*calc, f'--images={tmp_path / "ok"}', f'--ref={tmp_path / "nomu.npz"}'], '--ref'),
        ([*calc, f'--images={tmp_path / "ok"}', f'--ref={tmp_path / "dim.npz"}'], '--ref'),
        ([*calc, f'--images={tmp_path / "ok"}', f'--ref={tmp_path / "ok"}'], '--ref'),
        ([*calc, f'--images={tmp_path / "ok"}', f'--ref={ref}', '--num=5'], '--num'),
        (['calc', f'--images={tmp_path / "ok"}', f'--ref={ref}', f'--detector={tmp_path / "bad.pkl"}'], '--detector'),
        (['ref', f'--data={tmp_path / "ok"}', f'--dest={tmp_path / "ok"}', f'--detector={detector}'], '--dest'),
    ]
    for args, flag in cases:
        assert_one_line_error(fid_here(capsys, *args), flag)
    # The real entry point, once for an error found before and once during the computation.
    assert_one_line_error(run_cli('fid.py', *calc, f'--images={tmp_path / "ok"}', f'--ref={tmp_path / "nomu.npz"}'), '--ref')
    r = run_cli('fid.py', *calc, f'--images={tmp_path / "mixed"}', f'--ref={ref}')
    assert_one_line_error(r, '--images')
    assert '000009.png' in r.stderr and '9x9' in r.stderr
