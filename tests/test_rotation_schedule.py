"""rotation.py and `--search=rotation`: the cut points have equal rotation, the schedule is
deterministic and the same for every batch size and process count, and the flags that do not apply
are refused in one line."""

import json
import math

import numpy as np
import pytest
import torch

import gits
import rotation
import sample
import schedules
import student_search
from helpers import assert_one_line_error, run_here, sample_one_and_two_processes
from torch_utils.seeds import draw_seed_inputs


def test_equal_rotation_points_cut_equal_shares():
    t_tea = schedules.get_schedule(21, 0.002, 80)
    g = torch.Generator().manual_seed(0)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                            torch.rand(20, generator=g, dtype=torch.float64).cumsum(0)])
    cumulative[5:9] = cumulative[4]                       # no rotation over some intervals
    cumulative[9:] += cumulative[4] - cumulative[8]
    for n in (2, 4, 7, 12):
        ts = rotation.equal_rotation_points(cumulative, t_tea, n)
        assert len(ts) == n and ts[0] == t_tea[0] and ts[-1] == t_tea[-1] and (ts[1:] < ts[:-1]).all()
        # Rotation as a piecewise-linear function of log sigma, read at the cut points: equal shares.
        x = torch.log(t_tea).flip(0)
        reached = [float(np.interp(math.log(float(v)), x.numpy(), cumulative.flip(0).numpy())) for v in ts]
        total = float(cumulative[-1])
        assert reached == pytest.approx([k * total / (n - 1) for k in range(n)], abs=1e-9 * total)
    with pytest.raises(ValueError, match='--search'):
        rotation.equal_rotation_points(torch.zeros(21, dtype=torch.float64), t_tea, 5)


def test_rotation_search_is_deterministic_and_batch_invariant(digits):
    warm = draw_seed_inputs(range(7000, 7010), digits.shape, 0)[0]
    kw = dict(num_steps=6, sigma_min=0.002, sigma_max=80.0, num_steps_tea=21, search='rotation')
    first = student_search.search_schedule(digits.denoise, warm, batch_size=10, **kw)
    assert torch.equal(first, student_search.search_schedule(digits.denoise, warm, batch_size=10, **kw))
    for bs in (3, 4):
        assert torch.equal(first, student_search.search_schedule(digits.denoise, warm, batch_size=bs, **kw))
    # It is the mean rotation of the teacher trajectories, cut in equal parts.
    t_tea = schedules.get_schedule(21, 0.002, 80.0)
    data, _, _ = gits.run_teachers([(0, digits.denoise, warm)], t_tea, 'ipndm', max_order=4)
    per_traj = rotation.trajectory_rotation(data[0].xs)
    assert torch.equal(first, rotation.equal_rotation_points(per_traj.mean(0), t_tea, 6))
    # With afs: one more point at the same NFE.
    assert len(student_search.search_schedule(digits.denoise, warm, afs=True, **kw)) == 7


def test_torchrun_two_processes_same_rotation_schedule(tmp_path):
    args = ['--dataset_name=digits', '--seeds=0-1', '--dp=True', '--search=rotation', '--num_warmup=10', '--batch=4',
            '--solver=unipc', '--num_steps=6', '--num_steps_tea=21']
    one, two, _ = sample_one_and_two_processes(tmp_path, *args)
    assert one['t_steps'] == two['t_steps'] and one['search']['search'] == 'rotation'
    assert one['search']['num_warmup'] == two['search']['num_warmup'] == 10
    assert one['schedule_source'] == 'gits-rotation'
    # The same as the search on one batch of the same warm-up noise, in this process.
    import models
    model = models.load('digits')
    warm = draw_seed_inputs(range(gits.WARMUP_SEED, gits.WARMUP_SEED + 10), model.shape, 0)[0].float()
    ref = student_search.search_schedule(model.denoise, warm, num_steps=6, sigma_min=0.002, sigma_max=80.0,
                                         num_steps_tea=21, search='rotation', solver='unipc')
    assert one['t_steps'] == [float(t) for t in ref]


def test_rotation_schedule_file_round_trip(tmp_path):
    path = tmp_path / 'rot.json'
    common = ['--dataset_name=digits', '--num_warmup=4', '--num_steps_tea=21', '--device=cpu']
    r = run_here(sample.main, *common, '--dp=True', '--search=rotation', f'--save_schedules={path}',
                 '--save_num_steps=4-6')
    assert r.returncode == 0, r.stderr
    saved = json.loads(path.read_text())
    assert saved['search'] == 'rotation' and sorted(saved['schedules'], key=int) == ['4', '5', '6']
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', '--num_steps=5', f'--schedule_file={path}',
                 f'--outdir={tmp_path / "from_file"}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / 'from_file' / 'run.json').read_text())
    assert run['t_steps'] == saved['schedules']['5']


def test_rotation_schedule_is_a_start_of_the_refinement(tmp_path):
    """--search=rotation --refine=True: the rotation schedule joins the refinement's starts (it is
    compared with the GITS, solver-aware and fixed ones on the warm-up set), and the sampled schedule
    is the refinement's result."""
    out = tmp_path / 'o'
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', '--solver=ipndm', '--num_steps=5', '--dp=True',
                 '--search=rotation', '--refine=True', '--num_warmup=8', f'--outdir={out}', '--device=cpu')
    assert r.returncode == 0, r.stderr
    record = json.loads((out / 'run.json').read_text())
    refined = record['search']['refined']['5']
    assert 'rotation' in refined['start_objectives']
    assert set(refined['start_objectives']) >= {'gits', 'student', 'polynomial', 'logsnr', 'time_uniform'}
    assert record['search']['search'] == 'rotation' and record['search']['refine'] is True


@pytest.mark.parametrize('args, flag', [
    (['--compat=gits-main', '--max_order=4'], '--search'),
    (['--coeff=1.2'], '--coeff'),
    (['--metric=l2'], '--metric'),
])
def test_rotation_refusals(tmp_path, args, flag):
    r = run_here(sample.main, '--dataset_name=digits', '--seeds=0-1', '--dp=True', '--search=rotation',
                 '--num_warmup=4', *args, f'--outdir={tmp_path / "o"}', '--device=cpu')
    assert_one_line_error(r, flag)
    assert not (tmp_path / 'o').exists()


def test_rotation_search_on_a_diffusers_pipeline(tmp_path):
    """--dp --search=rotation on a tiny Flux pipeline: the search runs on the pipeline's denoiser and
    run.json records the schedule and its exports in flow time."""
    import diffusers_tiny
    folder = diffusers_tiny.build('flux', tmp_path / 'flux')
    out = tmp_path / 'out'
    r = run_here(sample.main, '--dataset_name=diffusers', f'--model_path={folder}', '--prompt=a red cube',
                 f'--resolution={diffusers_tiny.RESOLUTION}', '--seeds=0-1', '--batch=2', '--solver=dpmpp',
                 '--num_steps=5', '--dp=True', '--search=rotation', '--num_warmup=4', '--num_steps_tea=13',
                 f'--outdir={out}')
    assert r.returncode == 0, r.stderr
    record = json.loads((out / 'run.json').read_text())
    assert record['search']['search'] == 'rotation' and len(record['t_steps']) == 5
    assert record['search']['evals'] == {'teacher': 4 * 12}
    assert record['exports']['diffusers']['sigmas'][0] == 1.0          # flow time, t = 1 first
    assert sorted(p.name for p in out.glob('*.png')) == ['000000.png', '000001.png']
