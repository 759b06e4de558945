"""The figures of docs/analysis.md's sections on trajectory statistics and on the optimal denoiser,
made by trajectory.py's own commands on digits and gmm_wavelet, and the numbers the page quotes.

    python benchmarks/trajectory_figures.py                  # both models; a few minutes on 2 CPU cores
    python benchmarks/trajectory_figures.py --models=digits --out=/tmp/tf.json --assets=/tmp/assets

In a temporary folder, for each model: `trajectory.py dataset` writes its data set (digits: its
own 1797 images; gmm_wavelet: exact draws, labelled by component), `trajectory.py stats` and
`trajectory.py optimal --data=...` run with the flags of COMMANDS. The figures go to --assets
(stats_<model>.png, optimal_<model>.png, optimal_samples_<model>.png) and a summary of the
commands' JSON to --out (benchmarks/results/trajectory_figures.json, and its markdown).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import click
import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

import dnnlib                      # noqa: E402
from torch_utils import misc       # noqa: E402
import render                      # noqa: E402

RESULTS = os.path.join(BENCH, 'results', 'trajectory_figures.json')
ASSETS = os.path.join(ROOT, 'assets')

COMMON = ['--solver=ipndm', '--num_steps=61', '--device=cpu']
COMMANDS = {      # model -> the flags of its dataset, stats and optimal runs
    'digits': dict(dataset=[], stats=['--seeds=0-255', *COMMON], optimal=['--seeds=0-63', *COMMON]),
    'gmm_wavelet': dict(dataset=['--num=5000'], stats=['--seeds=0-255', *COMMON],
                        optimal=['--seeds=0-63', '--rank=16', '--num_plots=5', *COMMON]),   # noisy images: a small PNG
}


def run(*args):
    """`python trajectory.py ARGS` in the current folder; its error line stops the script."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'trajectory.py'), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise dnnlib.util.UserError(f'trajectory.py {args[0]} failed: {result.stderr.strip().splitlines()[-1]}')


def argmax(values):
    i = int(np.argmax(values))
    return i, values[i]


def summarize_stats(rec):
    """What the page reads off stats.png: where each trajectory is farthest from its chord (the
    median over seeds), and the smallest median cosine of the noise estimate and x_t - x_0."""
    t = rec['t_steps']
    s = rec['statistics']
    out = dict(num_seeds=rec['num_seeds'])
    for name in ('chord_distance_sampling', 'chord_distance_denoising'):
        i, v = argmax(s[name]['q50'])
        out[name] = dict(max_median=v, at_sigma=t[i])
    cos = [c for c in s['cosine_noise_estimate']['q50'] if c is not None]
    i = int(np.argmin(cos))
    out['cosine_noise_estimate'] = dict(min_median=cos[i], at_sigma=t[i],
                                        min_q05=min(c for c in s['cosine_noise_estimate']['q05'] if c is not None))
    out['norm_noise_estimate'] = dict(median_first=s['norm_noise_estimate']['q50'][0],
                                      median_last=s['norm_noise_estimate']['q50'][-1])
    return out


def summarize_optimal(rec):
    """Per fitted denoiser: the mean final-point RMSE against the model's sample from the same
    noise, and the largest mean gap to the model's denoiser on the model's states (and where)."""
    t = rec['t_steps']
    out = dict(num_seeds=rec['num_seeds'], data_size=rec['data_size'], denoisers={})
    for name in rec['trajectory_rmse']:
        i, gap = argmax(rec['denoiser_gap'][name]['mean'])
        out['denoisers'][name] = dict(final_rmse=rec['final_rmse'][name]['mean'][0],
                                      final_rmse_median=rec['final_rmse'][name]['q50'][0], max_denoiser_gap=gap,
                                      gap_at_sigma=t[i])
    return out


def markdown(record):
    """{key: (title, body)} for benchmarks/render.py."""
    rows = ['| model | seeds | sampling: max median chord distance (at sigma) | denoising: the same (at sigma) '
            '| min median cosine (at sigma) | min 5 % quantile of the cosine |', '|---|---|---|---|---|---|']
    for model, r in record['results'].items():
        s = r['stats']
        a, b, c = s['chord_distance_sampling'], s['chord_distance_denoising'], s['cosine_noise_estimate']
        rows.append(f'| {model} | {s["num_seeds"]} | {render.sig3(a["max_median"])} ({render.sig3(a["at_sigma"])}) '
                    f'| {render.sig3(b["max_median"])} ({render.sig3(b["at_sigma"])}) '
                    f'| {render.sig3(c["min_median"])} ({render.sig3(c["at_sigma"])}) | {render.sig3(c["min_q05"])} |')
    stats = '\n'.join(rows)
    rows = ['| model | data set | denoiser | final-point RMSE vs. the model: mean | median | max denoiser gap (at sigma) |',
            '|---|---|---|---|---|---|']
    for model, r in record['results'].items():
        o = r['optimal']
        for name, d in o['denoisers'].items():
            rows.append(f'| {model} | {o["data_size"]} | {name} | {render.sig3(d["final_rmse"])} '
                        f'| {render.sig3(d["final_rmse_median"])} '
                        f'| {render.sig3(d["max_denoiser_gap"])} ({render.sig3(d["gap_at_sigma"])}) |')
    optimal = '\n'.join(rows)
    return dict(stats=('Trajectory statistics (trajectory.py stats)', stats),
                optimal=('Fitted denoisers against the model (trajectory.py optimal)', optimal))


@click.command()
@click.option('--models', 'names', type=str, default=','.join(COMMANDS), help='Models, of ' + ', '.join(COMMANDS))
@click.option('--out', type=str, default=RESULTS, help='Results JSON')
@click.option('--assets', type=str, default=ASSETS, help='Folder of the figures')
def main(names, out, assets):
    """Run the commands, copy their figures and summarize their JSON."""
    names = names.split(',')
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        raise dnnlib.util.UserError(f'--models: unknown "{unknown[0]}"; choose among {", ".join(COMMANDS)}')
    results = {}
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)                    # the commands record relative paths (--data, --outdir)
        try:
            for model in names:
                flags = COMMANDS[model]
                run('dataset', f'--dataset_name={model}', f'--dest={model}.zip', *flags['dataset'])
                run('stats', f'--dataset_name={model}', f'--outdir=stats_{model}', *flags['stats'])
                run('optimal', f'--dataset_name={model}', f'--data={model}.zip', f'--outdir=optimal_{model}',
                    *flags['optimal'])
                os.makedirs(assets, exist_ok=True)
                for src, dest in [(f'stats_{model}/stats.png', f'stats_{model}.png'),
                                  (f'optimal_{model}/optimal.png', f'optimal_{model}.png'),
                                  (f'optimal_{model}/samples.png', f'optimal_samples_{model}.png')]:
                    shutil.copyfile(src, os.path.join(assets, dest))
                with open(f'stats_{model}/stats.json') as f:
                    stats = json.load(f)
                with open(f'optimal_{model}/optimal.json') as f:
                    optimal = json.load(f)
                results[model] = dict(commands={k: [f'--dataset_name={model}', *v] for k, v in flags.items()},
                                      stats=summarize_stats(stats), optimal=summarize_optimal(optimal))
        finally:
            os.chdir(here)
    record = dict(results=results)
    misc.atomic_write_json(out, record)
    print(render.write_markdown(out, markdown))


if __name__ == '__main__':
    dnnlib.run_cli(main)
