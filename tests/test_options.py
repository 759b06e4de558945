"""Options resolved once (options.py), the run record (run_record.py) and a newcomer's path:
resume identity, launch.sh dry runs, progress of the long stages, outputs that never overwrite
another command's, and schedules outside the model's noise range."""

import dataclasses
import json
import os
import re
import shutil
import subprocess

import pytest

import gits
import options
import run_record
import sample
import trajectory
from conftest import ROOT
from dnnlib.util import UserError
from helpers import assert_one_line_error, listing, run_here, torchrun

FAST = ['--solver=heun', '--num_steps=6']


# ----------------------------------------------------------------------------------------------
# The record.

def test_options_are_one_frozen_record_of_the_click_flags(tmp_path):
    flags = [p.name for p in sample.main.params if p.expose_value]
    cli_fields = [f.name for f in dataclasses.fields(options.Options) if not f.metadata.get('resolved')]
    assert cli_fields == flags                   # the same flags, in --help order (run.json's `options`)
    kwargs = dict({p.name: p.default for p in sample.main.params if p.expose_value}, dataset_name='digits',
                  seeds='3,1-2', t_steps='[80,1,0.002]', outdir=str(tmp_path / 'o'))
    opts = options.resolve(kwargs, given={'dataset_name', 'seeds', 't_steps', 'outdir'})
    assert opts.seed_list == (3, 1, 2) and opts.t_steps_list == [80.0, 1.0, 0.002]
    assert opts.solver_options == {'max_order': 4} and opts.teacher_options is None
    # Flags added after run.json's `options` was fixed are left out at their default (older records keep their bytes).
    omitted = {f.name for f in dataclasses.fields(options.Options) if f.metadata.get('omit_default')}
    assert omitted == {'refine_coefficients'}
    assert opts.command_line() == {k: v for k, v in kwargs.items() if k not in omitted}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed_list = (0,)
    # With --dp the teacher's options and the num_steps to search for are resolved too.
    opts = options.resolve(dict(kwargs, t_steps=None, dp=True, solver='dpmpp'), given={'dp', 'solver'})
    assert opts.teacher_options == {'max_order': 3} and opts.save_num_steps_list == [7]


def test_gits_defaults_come_from_gits():
    """Every CLI that takes a GITS search option has the gits.py default and the same type."""
    expected = dict(metric=gits.METRIC, coeff=gits.COEFF, solver_tea=gits.SOLVER_TEA, num_steps_tea=gits.NUM_STEPS_TEA,
                    num_warmup=gits.NUM_WARMUP, warmup_seed=gits.WARMUP_SEED)
    for command in (sample.main, trajectory.schedules):
        params = {p.name: p for p in command.params}
        assert {k: params[k].default for k in expected} == expected, command.name
        assert params['num_steps_tea'].type.min == 3
        assert list(params['metric'].type.choices) == list(gits.METRICS)


# ----------------------------------------------------------------------------------------------
# Resume identity.

IDENTITY_KEYS = {'dataset_name', 'checkpoint', 'solver', 'solver_options', 'compat', 't_steps', 'afs', 'denoise_to_zero',
                 'class_idx', 'guidance_rate', 'prompt', 'prompt_file', 'use_fp16', 'grid', 'subdirs',
                 'negative_prompt', 'dtype', 'resolution', 'start_scale', 'coefficients'}


def test_identity_key_set_is_pinned():
    """What decides whether a folder resumes: adding or dropping a key is a deliberate change."""
    assert set(run_record.IDENTITY) == IDENTITY_KEYS


# A flag that changes each identity key on the analytic `digits` model, with the name the refusal gives.
CHANGED_BY_FLAG = {
    'dataset_name': (['--dataset_name=gmm'], '--dataset_name (digits -> gmm)'),
    'solver': (['--solver=euler'], '--solver (heun -> euler)'),
    't_steps': (['--num_steps=5'], 'the schedule (t_steps)'),
    'afs': (['--afs=True'], '--afs (False -> True)'),
    'denoise_to_zero': (['--denoise_to_zero=True'], '--denoise_to_zero (False -> True)'),
    'grid': (['--grid=True'], '--grid (False -> True)'),
    'subdirs': (['--subdirs=True'], '--subdirs (False -> True)'),
}
# Keys no flag of `digits` can change (the model refuses the flag first): compared in run_record.
CHANGED_IN_RECORD = {'checkpoint': [{'size': 1, 'sha256': 'x'}], 'class_idx': 3, 'guidance_rate': 2.0,
                     'prompt': 'a cat', 'prompt_file': {'size': 1}, 'use_fp16': True,
                     'solver_options': {'max_order': 3}, 'compat': 'gits-main', 'negative_prompt': 'blurry',
                     'dtype': 'bfloat16', 'resolution': [64, 96], 'start_scale': 14.65,
                     'coefficients': {'predictor': [[1.0]]}}


def test_every_identity_key_is_checked():
    assert set(CHANGED_BY_FLAG) | set(CHANGED_IN_RECORD) == IDENTITY_KEYS


@pytest.fixture(scope='module')
def heun_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp('resume') / 'o'
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', f'--outdir={out}', *FAST)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize('key', sorted(CHANGED_BY_FLAG))
def test_resume_refuses_each_flag_that_changes_the_identity(heun_folder, key):
    args, named = CHANGED_BY_FLAG[key]
    before = {p: (heun_folder / p).read_bytes() for p in listing(heun_folder)}
    base = dict(a.split('=', 1) for a in ['--dataset_name=digits', *FAST])
    base.update(a.split('=', 1) for a in args)
    r = run_here(sample.main, '--seeds=0-1', f'--outdir={heun_folder}', *[f'{k}={v}' for k, v in base.items()])
    assert_one_line_error(r, named)
    assert 'holds images of another configuration' in r.stderr
    assert {p: (heun_folder / p).read_bytes() for p in listing(heun_folder)} == before     # nothing written


@pytest.mark.parametrize('key', sorted(CHANGED_IN_RECORD))
def test_resume_refuses_each_recorded_identity_key(heun_folder, key):
    ours = {k: v for k, v in json.loads((heun_folder / 'run.json').read_text()).items() if k in IDENTITY_KEYS}
    run_record.check_outdir(str(heun_folder), ours)          # the same identity resumes
    with pytest.raises(UserError, match='another configuration'):
        run_record.check_outdir(str(heun_folder), dict(ours, **{key: CHANGED_IN_RECORD[key]}))


def test_resume_accepts_what_does_not_change_images(heun_folder):
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-2', '--batch=2', '--device=cpu',
                 '--schedule_format=diffusers', f'--outdir={heun_folder}', *FAST)
    assert r.returncode == 0, r.stderr
    assert '2 of 3 seeds already done' in r.stdout


# ----------------------------------------------------------------------------------------------
# launch.sh: every section's dry run on a fresh copy, with nothing written.

def launch_sections():
    text = open(os.path.join(ROOT, 'launch.sh')).read()
    pretrained = re.search(r'^MODELS="([^"]+)"', text, re.M).group(1).split()
    return [(m, step) for m in pretrained for step in ('grid', 'search', 'sweep', 'tsteps', 'eval', 'all')] + \
        [('digits', None), ('gmm', None)]


def test_launch_dry_run_of_every_section_writes_nothing(tmp_path):
    """Only launch.sh is copied: a dry run must not need (or run) anything, so a section that read
    a file of an earlier real run, or created a folder, fails here."""
    shutil.copy(os.path.join(ROOT, 'launch.sh'), tmp_path / 'launch.sh')
    env = dict(os.environ, DRY_RUN='1', PATH=os.environ['PATH'])
    counts = {}
    for model, step in launch_sections():
        args = ['bash', str(tmp_path / 'launch.sh'), model] + ([step] if step else [])
        r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert r.returncode == 0 and not r.stderr, (model, step, r.stderr)
        counts[model, step] = len([l for l in r.stdout.splitlines() if l.startswith('+ ')])
        assert listing(tmp_path) == ['launch.sh'], (model, step)
    sweep = 8                                                   # SWEEP_STEPS=4-11
    assert counts['cifar10', 'all'] == 1 + 1 + sweep + 1 + sweep
    assert counts['ms_coco', 'eval'] == 2 * sweep               # FID and CLIP score
    assert counts['digits', None] == counts['gmm', None] == 7
    assert all(counts[m, 'tsteps'] == 1 for m, s in counts if s == 'tsteps')


# ----------------------------------------------------------------------------------------------
# Progress of the long stages.

def test_search_and_trajectory_analysis_show_progress(tmp_path):
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', '--dp=True', '--num_warmup=4',
                 '--num_steps_tea=13', f'--outdir={tmp_path / "s"}')
    assert r.returncode == 0, r.stderr
    assert re.search(r'GITS search: 100%.*\b48/48 ', r.stdout), r.stdout    # 4 trajectories x 12 iPNDM steps
    r = run_here(trajectory.main, 'analyze', '--dataset_name=digits', '--seeds=0-2', '--num_steps=7',
                 f'--outdir={tmp_path / "t"}')
    assert r.returncode == 0, r.stderr
    assert re.search(r'Trajectories: 100%.*\b21/21 ', r.stdout), r.stdout    # 3 x (6 steps + D at the end)


# ----------------------------------------------------------------------------------------------
# Outputs of different commands never overwrite each other.

def test_trajectory_commands_have_their_own_folders_and_refuse_another_run(tmp_path):
    analyze = ['analyze', '--dataset_name=digits', '--seeds=0-1', '--num_steps=7']
    r = run_here(trajectory.main, *analyze, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_here(trajectory.main, 'schedules', '--dataset_name=digits', '--num_steps=4', '--num_warmup=2',
                 '--num_steps_tea=7', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'trajectories' / 'digits')) == ['analyze', 'schedules']
    out = tmp_path / 'trajectories' / 'digits' / 'analyze'
    before = {p: (out / p).read_bytes() for p in listing(out)}
    assert_one_line_error(run_here(trajectory.main, 'analyze', '--dataset_name=digits', '--seeds=0-3', '--num_steps=7',
                                   cwd=tmp_path), '--outdir')
    assert {p: (out / p).read_bytes() for p in listing(out)} == before
    # A rerun of the same command replaces its own outputs.
    assert run_here(trajectory.main, *analyze, cwd=tmp_path).returncode == 0
    # launch.sh's offline section writes into trajectories/<model>, no command's default folder.
    launch = subprocess.run(['bash', os.path.join(ROOT, 'launch.sh'), 'digits'], capture_output=True, text=True,
                            env=dict(os.environ, DRY_RUN='1'), timeout=60).stdout
    folders = set(re.findall(r'trajectory\.py \w+ .*--outdir=(\S+)', launch))
    assert folders == {'trajectories/digits'}


# ----------------------------------------------------------------------------------------------
# Schedules outside the model's noise range.

def warnings_of(stderr):
    return [l for l in stderr.splitlines() if l.startswith('Warning:')]


def test_schedule_outside_the_model_range_warns_once(tmp_path):
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0', '--t_steps=[100,1,0.002]', f'--outdir={tmp_path / "a"}')
    assert r.returncode == 0, r.stderr
    (line,) = warnings_of(r.stderr)
    assert 'sigma 100 to 0.002' in line and '[0.002, 80]' in line
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0', '--t_steps=[80,1,0.001]', f'--outdir={tmp_path / "b"}')
    assert len(warnings_of(r.stderr)) == 1
    for ok in ('--t_steps=[80,1,0.002]', '--num_steps=4'):         # the model's own ends: no warning
        r = run_here(sample.main, '--dataset_name=digits', '--seeds=0', ok, f'--outdir={tmp_path / ok[2:9]}')
        assert r.returncode == 0 and not warnings_of(r.stderr), r.stderr
    # A schedule file's entry.
    path = tmp_path / 'sched.json'
    path.write_text(json.dumps({'dataset_name': 'digits', 'schedules': {'3': [120.0, 1.0, 0.002]}}))
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0', '--num_steps=3', f'--schedule_file={path}',
                 f'--outdir={tmp_path / "c"}')
    assert r.returncode == 0 and len(warnings_of(r.stderr)) == 1, r.stderr
    # trajectory.py analyze.
    r = run_here(trajectory.main, 'analyze', '--dataset_name=digits', '--seeds=0', '--t_steps=[100,1,0.002]',
                 f'--outdir={tmp_path / "t"}')
    assert r.returncode == 0 and len(warnings_of(r.stderr)) == 1, r.stderr


def test_range_warning_is_printed_once_under_torchrun(tmp_path):
    r = torchrun('sample.py', 2, '--dataset_name=digits', '--seeds=0-3', '--batch=2', '--t_steps=[100,1,0.002]',
                 f'--outdir={tmp_path}')
    assert r.returncode == 0, r.stderr
    assert len(warnings_of(r.stderr)) == 1, r.stderr
