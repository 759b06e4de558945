"""sample.py end to end on the analytic models: determinism across batch size and processes,
resume, grid, run record, and the one-line error contract."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, run_cli, torchrun

FAST = ['--solver=heun', '--num_steps=6']


def read_pngs(folder):
    return {name: open(os.path.join(folder, name), 'rb').read()
            for name in sorted(os.listdir(folder)) if name.endswith('.png')}


def test_images_identical_across_batch_and_processes(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    r = run_cli('sample.py', '--dataset_name=gmm', '--seeds=0-9', '--batch=4', f'--outdir={a}', *FAST)
    assert r.returncode == 0, r.stderr
    r = torchrun('sample.py', 2, '--dataset_name=gmm', '--seeds=0-9', '--batch=6', f'--outdir={b}', *FAST)
    assert r.returncode == 0, r.stderr
    pa, pb = read_pngs(a), read_pngs(b)
    assert sorted(pa) == [f'{s:06d}.png' for s in range(10)]
    assert pa == pb
    # Different seeds give different images.
    assert pa['000000.png'] != pa['000001.png']


def test_resume_skips_finished_seeds_and_ends_identical(tmp_path):
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert run_cli('sample.py', '--dataset_name=digits', '--seeds=0-7', f'--outdir={full}', *FAST).returncode == 0
    assert run_cli('sample.py', '--dataset_name=digits', '--seeds=0-7', '--batch=3', f'--outdir={part}', *FAST).returncode == 0
    # Simulate an interruption: drop some images and leave a stray temporary file behind.
    for s in (2, 5, 7):
        os.remove(part / f'{s:06d}.png')
    mtime = os.path.getmtime(part / '000000.png')
    r = run_cli('sample.py', '--dataset_name=digits', '--seeds=0-7', '--batch=2', f'--outdir={part}', *FAST)
    assert r.returncode == 0, r.stderr
    assert read_pngs(full) == read_pngs(part)
    assert os.path.getmtime(part / '000000.png') == mtime      # finished seeds were not redone


def test_subdirs_and_run_record(tmp_path):
    out = tmp_path / 'o'
    r = run_cli('sample.py', '--dataset_name=digits', '--seeds=998-1001', '--subdirs=True', f'--outdir={out}', *FAST)
    assert r.returncode == 0, r.stderr
    assert (out / '000000' / '000999.png').is_file()
    assert (out / '001000' / '001001.png').is_file()
    record = json.loads((out / 'run.json').read_text())
    assert record['nfe'] == 10 and len(record['t_steps']) == 6
    printed = [l for l in r.stdout.splitlines() if '--t_steps=' in l][0]
    text = printed.split('--t_steps=')[1].strip()
    assert text == record['t_steps_text'] and ' ' not in text


def test_pasted_schedule_reproduces_images(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    r = run_cli('sample.py', '--dataset_name=gmm', '--seeds=0-3', f'--outdir={a}', *FAST, '--schedule_type=logsnr')
    assert r.returncode == 0, r.stderr
    text = json.loads((a / 'run.json').read_text())['t_steps_text']
    r = run_cli('sample.py', '--dataset_name=gmm', '--seeds=0-3', f'--outdir={b}', '--solver=heun', f'--t_steps={text}')
    assert r.returncode == 0, r.stderr
    assert read_pngs(a) == read_pngs(b)


def test_default_outdir_and_grid(tmp_path):
    r = run_cli('sample.py', '--dataset_name=digits', '--seeds=0-15', '--grid=True', *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    grid = tmp_path / 'samples' / 'digits' / 'heun_nfe10' / 'grid.png'
    img = np.asarray(Image.open(grid))
    assert img.shape == (4 * 32 + 3 * 4, 4 * 32 + 3 * 4)   # 4x4 tiles of 8x8 digits enlarged 4x, 4-pixel gaps
    assert not [p for p in os.listdir(grid.parent) if p.endswith('.png') and p != 'grid.png']


def test_digit_samples_are_digits(tmp_path, digits):
    """The optimal denoiser of a finite set reproduces training points: every sampled image must be
    within PNG rounding of one of the 1797 digits."""
    out = tmp_path / 'd'
    r = run_cli('sample.py', '--dataset_name=digits', '--seeds=0-15', f'--outdir={out}', '--solver=heun', '--num_steps=18')
    assert r.returncode == 0, r.stderr
    data = digits.data.numpy().reshape(-1, 64)
    for name, png in read_pngs(out).items():
        img = np.asarray(Image.open(out / name), dtype=np.float64).reshape(64) / 127.5 - 1
        assert np.abs(data - img).max(axis=1).min() < 0.05, name


BAD_INPUTS = [
    (['--dataset_name=nope'], '--dataset_name'),
    (['--dataset_name=gmm', '--seeds=0-x'], '--seeds'),
    (['--dataset_name=gmm', '--seeds=5-2'], '--seeds'),
    (['--dataset_name=gmm', '--t_steps=[80,1,2,0.002]'], '--t_steps'),
    (['--dataset_name=gmm', '--t_steps=[80,abc]'], '--t_steps'),
    (['--dataset_name=gmm', '--t_steps=[80,1,-0.5]'], '--t_steps'),
    (['--dataset_name=gmm', '--batch', '0'], '--batch'),
    (['--dataset_name=gmm', '--num_steps', '1'], '--num_steps'),
    (['--dataset_name=gmm', '--solver=rk45'], '--solver'),
    (['--dataset_name=gmm', '--schedule_type=cosine'], '--schedule_type'),
    (['--dataset_name=gmm', '--grid=maybe'], '--grid'),
    (['--dataset_name=gmm', '--prompt=a cat'], '--prompt'),
    (['--dataset_name=gmm', '--sigma_min=-1'], '--sigma_min'),
]


@pytest.mark.parametrize('args,flag', BAD_INPUTS)
def test_bad_input_one_line_no_output(tmp_path, args, flag):
    out = tmp_path / 'out'
    r = run_cli('sample.py', *args, f'--outdir={out}', '--solver=heun' if '--solver' not in flag else '--seeds=0')
    assert_one_line_error(r, flag)
    assert not out.exists()


def test_unwritable_outdir(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    r = run_cli('sample.py', '--dataset_name=gmm', '--solver=heun', f'--outdir={blocker / "sub"}')
    assert_one_line_error(r, '--outdir')
