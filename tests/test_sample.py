"""sample.py end to end on the analytic models: determinism across batch size and processes,
resume, grid, run record, one configuration per output folder, default folder names, and the
one-line error contract (also under torchrun)."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import options
import run_record
import sample
import schedules
from conftest import ROOT
from helpers import assert_one_line_error, listing, run_cli, run_here, torchrun

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
    assert run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', f'--outdir={full}', *FAST).returncode == 0
    assert run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', '--batch=3', f'--outdir={part}', *FAST).returncode == 0
    # Simulate an interruption: drop some images, and leave what an interrupted atomic write
    # leaves (a temporary file beside its target: the PNG of seed 5, half written).
    for s in (2, 5, 7):
        os.remove(part / f'{s:06d}.png')
    half = (full / '000005.png').read_bytes()[:40]
    (part / '.000005.png.k2j4x9_q.tmp').write_bytes(half)
    mtime = os.path.getmtime(part / '000000.png')
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', '--batch=2', f'--outdir={part}', *FAST)
    assert r.returncode == 0, r.stderr
    assert 'Resuming' in r.stdout and '5 of 8 seeds already done' in r.stdout
    assert read_pngs(full) == read_pngs(part)                  # the temporary file was no image
    assert os.path.getmtime(part / '000000.png') == mtime      # finished seeds were not redone
    # A rerun with every seed done samples nothing and says so.
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', f'--outdir={part}', *FAST)
    assert r.returncode == 0 and '8 of 8 seeds already done' in r.stdout
    assert read_pngs(full) == read_pngs(part)


def test_resume_refuses_another_configuration(tmp_path):
    """The issue's case: iPNDM into a folder, then Euler with 3 points into the same folder."""
    out = tmp_path / 'o'
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    before = {p: (out / p).read_bytes() for p in listing(out)}
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', f'--outdir={out}', '--solver=euler', '--num_steps=3')
    assert_one_line_error(r, '--outdir')
    assert '--solver (ipndm -> euler)' in r.stderr and 'the schedule (t_steps)' in r.stderr
    assert {p: (out / p).read_bytes() for p in listing(out)} == before     # images and run.json untouched
    # Every setting of IDENTITY is compared, e.g. a solver option or afs alone; batch is not.
    for args, named in ((['--max_order=3'], '--max_order (4 -> 3)'), (['--afs=True'], '--afs (False -> True)'),
                        (['--grid=True'], '--grid')):
        r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-7', f'--outdir={out}', *args)
        assert_one_line_error(r, named)
    assert {p: (out / p).read_bytes() for p in listing(out)} == before
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-9', '--batch=3', f'--outdir={out}')
    assert r.returncode == 0 and '8 of 10 seeds already done' in r.stdout
    # A folder with images but no record of their configuration is refused too.
    os.remove(out / 'run.json')
    assert_one_line_error(run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', f'--outdir={out}'), '--outdir')


def test_subdirs_and_run_record(tmp_path):
    out = tmp_path / 'o'
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=998-1001', '--subdirs=True', f'--outdir={out}', *FAST)
    assert r.returncode == 0, r.stderr
    assert (out / '000000' / '000999.png').is_file()
    assert (out / '001000' / '001001.png').is_file()
    record = json.loads((out / 'run.json').read_text())
    assert record['nfe'] == 10 and len(record['t_steps']) == 6
    printed = [l for l in r.stdout.splitlines() if '--t_steps=' in l][0]
    text = printed.split('--t_steps=')[1].strip()
    assert text == record['t_steps_text'] and ' ' not in text
    # The ends of a named schedule are sigma_max and sigma_min exactly, and print as such.
    assert text.startswith('[80.0,') and text.endswith(',0.002]')
    # Resolved values, each once: no null outdir or device, the solver's options at the top level.
    assert record['options']['outdir'] == str(out) and record['options']['device'] == 'cpu'
    assert 'solver_options' in record and 'solver_options' not in record['options']
    assert set(run_record.IDENTITY) - set(run_record.OMITTED_WHEN_NONE) <= set(record) and record['subdirs'] is True
    assert not set(run_record.OMITTED_WHEN_NONE) & set(record)       # absent at None: older files keep their bytes
    assert set(record['given']) == {'dataset_name', 'seeds', 'subdirs', 'outdir', 'solver', 'num_steps'}


def test_pasted_schedule_reproduces_images(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    r = run_cli('sample.py', '--dataset_name=gmm', '--seeds=0-3', f'--outdir={a}', *FAST, '--schedule_type=logsnr')
    assert r.returncode == 0, r.stderr
    text = json.loads((a / 'run.json').read_text())['t_steps_text']
    r = run_cli('sample.py', '--dataset_name=gmm', '--seeds=0-3', f'--outdir={b}', '--solver=heun', f'--t_steps={text}')
    assert r.returncode == 0, r.stderr
    assert read_pngs(a) == read_pngs(b)


def test_default_outdir_and_grid(tmp_path):
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-15', '--grid=True', *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    grid = tmp_path / 'samples' / 'digits' / 'heun_nfe10' / 'grid.png'
    img = np.asarray(Image.open(grid))
    assert img.shape == (4 * 32 + 3 * 4, 4 * 32 + 3 * 4)   # 4x4 tiles of 8x8 digits enlarged 4x, 4-pixel gaps
    assert not [p for p in os.listdir(grid.parent) if p.endswith('.png') and p != 'grid.png']
    # A grid is drawn whole: a rerun of the same configuration with other seeds replaces it.
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-3', '--grid=True', *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.asarray(Image.open(grid)).shape == (2 * 32 + 4, 2 * 32 + 4)


GITS_FAST = ['--num_warmup=4', '--num_steps_tea=13']


def test_default_folder_names_never_shared(tmp_path):
    """The issue's collisions: --dp and the polynomial schedule, and --afs against num_steps - 1,
    each wrote samples/digits/ipndm_nfe6 (or _nfe5). Every default run gets its own folder."""
    runs = {(): ('ipndm_nfe6', 'polynomial'), ('--dp=True', *GITS_FAST): ('ipndm_nfe6_gits', 'gits'),
            ('--afs=True',): ('ipndm_nfe5_afs', 'polynomial'), ('--num_steps=6',): ('ipndm_nfe5', 'polynomial'),
            ('--dp=True', '--afs=True', *GITS_FAST): ('ipndm_nfe6_gits_afs', 'gits'),
            ('--schedule_type=logsnr',): ('ipndm_nfe6_logsnr', 'logsnr')}
    for args, (name, source) in runs.items():
        r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-3', '--grid=True', *args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
        folder = tmp_path / 'samples' / 'digits' / name
        record = json.loads((folder / 'run.json').read_text())
        assert (folder / 'grid.png').is_file() and record['schedule_source'] == source
        assert record['afs'] == ('--afs=True' in args)
    assert sorted(os.listdir(tmp_path / 'samples' / 'digits')) == sorted(n for n, _ in runs.values())
    # The other schedule sources and variants (no sampling needed to name them).
    def name(*args, nfe=6):
        kwargs = dict({p.name: p.default for p in sample.main.params if p.expose_value}, dataset_name='digits')
        for a in args:
            key, value = a[2:].split('=', 1)
            kwargs[key] = {'True': True, 'False': False}.get(value, value)
        kwargs['schedule_rho'] = float(kwargs['schedule_rho'])
        t_steps_list = schedules.parse_t_steps(kwargs['t_steps']) if kwargs['t_steps'] else None
        return os.path.basename(run_record.default_outdir(options.Options(**kwargs, t_steps_list=t_steps_list), nfe))
    assert name('--schedule_rho=5') == 'ipndm_nfe6_polynomial-rho5'
    assert name('--schedule_type=time_uniform', '--schedule_rho=1') == 'ipndm_nfe6_time_uniform-rho1'
    assert name('--dp=True', '--search=student', '--refine=True') == 'ipndm_nfe6_gits-student-refined'
    assert name('--dp=True', '--schedule_type=logsnr') == 'ipndm_nfe6_gits-logsnr'
    assert name('--schedule_file=sched/digits_gits.json') == 'ipndm_nfe6_file-digits_gits'
    assert name('--denoise_to_zero=True', nfe=7) == 'ipndm_nfe7_dtz'
    a, b = name('--t_steps=[80,1,0.002]', nfe=2), name('--t_steps=[80,2,0.002]', nfe=2)
    assert re.fullmatch(r'ipndm_nfe2_tsteps-[0-9a-f]{8}', a) and a != b
    assert name('--t_steps=[80.0,1.0,2e-3]', nfe=2) == a       # the same schedule written otherwise


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
    (['--dataset_name=gmm', '--seeds=1,1,2'], '--seeds'),                 # a seed twice: refused
    (['--dataset_name=gmm', '--seeds=0-3,2'], '--seeds'),
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
    (['--dataset_name=digits', '--class_idx=3'], '--class_idx'),           # unconditional: no "0 <= class_idx < 0"
    # Device strings, checked before anything loads: what was given, what is available.
    (['--dataset_name=gmm', '--device=gpu0'], '--device'),
    (['--dataset_name=gmm', '--device=tpu9'], '--device'),
    (['--dataset_name=gmm', '--device=cuda:99'], '--device'),
    (['--dataset_name=gmm', '--device=meta'], '--device'),
    # GITS options without --dp.
    *[(['--dataset_name=digits', flag], flag.split('=')[0]) for flag in (
        '--metric=l2', '--coeff=2', '--solver_tea=heun', '--num_steps_tea=21', '--num_warmup=4', '--warmup_seed=99',
        '--save_num_steps=3-5', '--search=student', '--refine=True', '--refine_budget=2', '--save_schedules=s.json')],
    (['--dataset_name=digits', '--dp=True', '--refine_budget=2'], '--refine_budget'),        # needs --refine
    (['--dataset_name=digits', '--dp=True', '--save_num_steps=3-5'], '--save_num_steps'),    # needs --save_schedules
    # Schedule options with --t_steps, and the exponent of a schedule that has none.
    *[(['--dataset_name=digits', '--t_steps=[80,1,0.002]', flag], flag.split('=')[0]) for flag in (
        '--num_steps=3', '--schedule_type=logsnr', '--schedule_rho=5', '--sigma_min=0.01', '--sigma_max=50')],
    (['--dataset_name=digits', '--schedule_type=logsnr', '--schedule_rho=3'], '--schedule_rho'),
]


@pytest.mark.parametrize('args,flag', BAD_INPUTS)
def test_bad_input_one_line_no_output(tmp_path, args, flag):
    """Each refusal: exit code 2, one line naming the flag, no traceback, nothing written (not
    even the default output folder)."""
    out = tmp_path / 'out'
    r = run_here(sample.main, *args, f'--outdir={out}', '--solver=heun' if '--solver' not in flag else '--seeds=0',
                 cwd=tmp_path)
    assert r.returncode == 2
    assert_one_line_error(r, flag)
    assert listing(tmp_path) == []


@pytest.mark.parametrize('script,args', [
    ('sample', ['--dataset_name=digits']),
    ('fid', ['calc', '--images=nowhere', '--ref=nothing.npz']),
    ('fid', ['ref', '--data=nowhere', '--dest=out.npz']),
    ('clip_score', ['calc', '--images=nowhere']),
    ('trajectory', ['analyze', '--dataset_name=digits']),
    ('trajectory', ['schedules', '--dataset_name=digits']),
])
@pytest.mark.parametrize('device', ['gpu0', 'tpu9', 'cuda:99'])
def test_device_checked_first_by_every_cli(tmp_path, script, args, device):
    """One helper (torch_utils.distributed.check_device), before anything else is read or loaded:
    one line with what was given and what is available."""
    import importlib
    r = run_here(importlib.import_module(script).main, *args, f'--device={device}', cwd=tmp_path)
    assert_one_line_error(r, '--device')
    assert f'"{device}"' in r.stderr and 'available' in r.stderr and 'cpu' in r.stderr
    assert listing(tmp_path) == []


def test_inapplicable_flags_are_judged_as_given(tmp_path):
    """Only flags named on the command line are refused: a default value never is, and naming a
    flag with its default value is (click's ParameterSource)."""
    args = ['--dataset_name=digits', '--seeds=0-1', '--t_steps=[80,1,0.002]', f'--outdir={tmp_path / "o"}']
    assert run_here(sample.main, *args).returncode == 0
    assert_one_line_error(run_here(sample.main, *args, '--num_steps=7'), '--num_steps')
    assert_one_line_error(run_here(sample.main, *args, '--metric=dev'), '--metric')


@pytest.mark.parametrize('args,flag', [
    (['--save_schedules={tmp}/s.json', '--outdir={tmp}/o'], '--outdir'),          # nothing is sampled
    (['--save_schedules={tmp}/s.json', '--seeds=0-3'], '--seeds'),
    (['--save_schedules={tmp}/blocker/s.json'], '--save_schedules'),               # checked before the search
    (['--save_schedules={tmp}'], '--save_schedules'),                              # a folder
])
def test_save_schedules_refusals(tmp_path, args, flag):
    (tmp_path / 'blocker').write_text('a file where a folder should be')
    before = listing(tmp_path)
    r = run_here(sample.main, '--dataset_name=digits', '--dp=True', *GITS_FAST, *[a.format(tmp=tmp_path) for a in args],
                 cwd=tmp_path)
    assert_one_line_error(r, flag)
    assert 'GITS search' not in r.stdout and listing(tmp_path) == before


def test_unwritable_outdir(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    r = run_cli('sample.py', '--dataset_name=gmm', '--solver=heun', f'--outdir={blocker / "sub"}')
    assert_one_line_error(r, '--outdir')


def test_torchrun_errors_print_once(tmp_path):
    """Under torchrun an error is printed once, by rank 0 when every rank meets it (a bad flag) or
    by the one rank that does (it cannot write an image of its share); every rank exits with
    status 2 or is stopped by torchrun, none with a traceback of ours or an abort. What remains
    is torchrun's own report (its log lines, its launcher's traceback and failure summary), which
    quotes our line as the root cause."""
    def check(r, flag):
        text = r.stdout + r.stderr
        assert r.returncode != 0
        errors = [l for l in text.splitlines() if l.startswith('Error:')]
        assert len(errors) == 1 and flag in errors[0], text
        assert 'terminate called' not in text and '[rank' not in text, text
        assert not [l for l in text.splitlines() if l.strip().startswith('File') and ROOT in l], text
        codes = [int(c) for c in re.findall(r'exitcode\s*:\s*(-?\d+)', text)]
        assert codes and set(codes) <= {2, -15}, text          # our status, or torchrun's SIGTERM
        assert f'traceback : {errors[0]}' in text                # the summary quotes the root cause

    out = tmp_path / 'o'
    r = torchrun('sample.py', 2, '--dataset_name=digits', '--seeds=0-3', f'--outdir={out}', '--metric=l2')
    check(r, '--metric')
    assert not out.exists()
    # Seed 3 falls to rank 1 (batches [0, 1] and [2, 3]); a folder in the way of its PNG makes
    # the write fail there alone. Rank 0 finishes its share and stops quietly.
    (out / '000003.png').mkdir(parents=True)
    r = torchrun('sample.py', 2, '--dataset_name=digits', '--seeds=0-3', f'--outdir={out}', '--solver=euler',
                 '--num_steps=3')
    check(r, '--outdir')


def test_next_batch_noise_is_drawn_while_the_current_one_samples(tmp_path, monkeypatch):
    """sample.py's loop takes each batch's per-seed inputs from `drawn_ahead`: the draw of batch
    k + 1 is already on the helper thread when batch k is handed out, and every input is the one
    its seed draws alone."""
    handed_out = []

    def recording(batches, *args):
        for item in real(batches, *args):
            handed_out.append(item[0])
            yield item

    real = sample.drawn_ahead
    monkeypatch.setattr(sample, 'drawn_ahead', recording)
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-4', '--batch=2', f'--outdir={tmp_path}', *FAST)
    assert r.returncode == 0 and handed_out == [[0, 1], [2, 3], [4]]

    import concurrent.futures
    from torch_utils import seeds as seeds_module

    submitted = []

    class Recording(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, batch, *args):
            submitted.append(list(batch))
            return super().submit(fn, batch, *args)

    batches = [[5, 1], [9], [2, 7, 3]]
    with Recording(max_workers=1) as drawer:
        for k, (batch, (noise, labels)) in enumerate(seeds_module.drawn_ahead(batches, (1, 4, 4), 10, drawer)):
            assert submitted == batches[:k + 2]
            alone = [seeds_module.draw_seed_inputs([s], (1, 4, 4), 10) for s in batch]
            assert batch == batches[k]
            assert all(np.array_equal(noise[i].numpy(), a[0][0].numpy()) for i, a in enumerate(alone))
            assert [int(v) for v in labels] == [int(a[1][0]) for a in alone]
    assert k == len(batches) - 1
