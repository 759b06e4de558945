"""Throughput of sample.py's sampling loop against a bare loop of denoiser calls.

    python benchmarks/throughput.py                                   # CPU default: ipndm, < 10 min
    python benchmarks/throughput.py --solvers=all --batch=256 --num_steps=7 --seed_counts=256,1024 --device=cuda

The network is our own EDM SongUNet (models/edm_networks.py) at the real CIFAR-10 DDPM++
configuration (edm-cifar10-32x32-uncond-vp.pkl's network_kwargs, 55.7 M parameters) with random weights: the
cost of a forward pass does not depend on the weights, and no checkpoint is needed.

- "loop": sample.py itself (its click command, run in this process with `models.load` patched to
  return the network above), over `seeds` seeds in batches of `batch`: per-seed noise, the solver,
  uint8 conversion, PNG encoding and atomic writes, exactly the code users run.
- "bare": the same number of denoiser calls on a tensor of the same shape, nothing else.

loop / bare is the solver and I/O overhead. As the two are separate runs, load on a shared
machine adds noise to that ratio, so the loop also times its own denoiser calls (the bound
denoiser is wrapped); `in-loop overhead` = (loop time - time inside the denoiser) / time inside
the denoiser, which is immune to that noise; the ratio of process CPU times is reported too. Peak memory (CPU: the peak resident set size, reset
before each run through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated) is taken
for each seed count; it must not grow with the number of seeds.
"""

import contextlib
import io
import json
import math
import os
import runpy
import statistics
import sys
import tempfile
import time
from unittest import mock

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dnnlib                  # noqa: E402
import models                  # noqa: E402
import schedules               # noqa: E402
import solvers                 # noqa: E402
from dnnlib.util import UserError   # noqa: E402
from torch_utils import misc   # noqa: E402
from torch_utils.seeds import split_batches   # noqa: E402
import render                  # noqa: E402

# network_kwargs of edm-cifar10-32x32-uncond-vp.pkl (tests/data/specs/edm-cifar10-32x32-uncond-vp.json;
# tests/test_trajectory.py checks the copy), kept here so the benchmark runs without the specs.
CIFAR10_KWARGS = dict(
    class_name='training.networks.EDMPrecond', img_resolution=32, img_channels=3, label_dim=0,
    model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], augment_dim=9,
    dropout=0.13, use_fp16=False)


# ----------------------------------------------------------------------------------------------
# The network.

def build_model(device, use_fp16=False, model_channels=None, spec=None, seed=0):
    """EDMModel around a freshly initialised EDMPrecond(SongUNet) with the checkpoint's kwargs
    (or those of a spec JSON's `network_kwargs`)."""
    from models import edm
    from models import edm_networks
    kwargs = dict(CIFAR10_KWARGS)
    if spec is not None:
        with open(spec) as f:
            kwargs = dict(json.load(f)['network_kwargs'])
    class_name = kwargs.pop('class_name').rsplit('.', 1)[-1]
    if model_channels is not None:            # smaller network for smoke tests
        kwargs['model_channels'] = int(model_channels)
    torch.manual_seed(seed)
    net = getattr(edm_networks, class_name)(**kwargs)
    return edm.EDMModel(net, device=device, use_fp16=use_fp16), kwargs


class TimedDenoiser:
    """Counts the calls of a denoiser and the wall time spent inside them."""

    def __init__(self, denoise, sync):
        self.denoise, self.sync = denoise, sync
        self.calls, self.seconds = 0, 0.0

    def __call__(self, x, sigma):
        self.sync()
        t0 = time.perf_counter()
        out = self.denoise(x, sigma)
        self.sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


# ----------------------------------------------------------------------------------------------
# Memory.

class PeakMemory:
    """Peak memory of the block: CUDA allocator peak, or the process's peak RSS (VmHWM) after
    resetting it. Both in MiB; `rss_after` is the resident size when the block ends."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')        # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                pass                    # then VmHWM is the peak since the process started
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            self.after = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            status = _proc_status()
            self.peak, self.after = status.get('VmHWM', math.nan), status.get('VmRSS', math.nan)


def _proc_status():
    out = {}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                key, _, value = line.partition(':')
                if value.strip().endswith('kB'):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# The two loops.

def sample_command():
    """sample.py's click command. The script is what is measured, so it is loaded as a script
    (runpy), not imported as a library: no module of the project imports the CLI."""
    return runpy.run_path(os.path.join(ROOT, 'sample.py'))['main']


def run_sample_py(model, args, sync):
    """sample.py's command on `args`, with models.load returning `model` and its bound denoisers
    timed. Returns (seconds, TimedDenoiser)."""
    timer = TimedDenoiser(None, sync)
    plain_bind = model.bind

    def bind(**cond):
        timer.denoise = plain_bind(**cond)
        return timer

    with mock.patch.object(models, 'load', lambda *a, **k: model), mock.patch.object(model, 'bind', bind), \
            contextlib.redirect_stdout(io.StringIO()):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        sample_command().main(args=args, standalone_mode=False)
        sync()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, timer


def run_bare(model, num_batches, batch_sizes, t_steps, nfe, device, sync):
    """`nfe` denoiser calls per batch at the schedule's noise levels, on fixed noise."""
    denoise = model.bind()
    sigmas = [float(t) for t in t_steps]
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in range(num_batches):
            x = torch.randn([batch_sizes[b], *model.shape], device=device)
            for k in range(nfe):
                x = denoise(x, sigmas[k % len(sigmas)])
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def batch_sizes(num_seeds, batch):
    return [len(b) for b in split_batches(list(range(num_seeds)), batch, 1)]


# ----------------------------------------------------------------------------------------------

def benchmark_solver(model, solver, opts, device, sync, workdir):
    t_steps = schedules.get_schedule(opts.num_steps, model.sigma_min, model.sigma_max)
    nfe = solvers.count_nfe(solver, opts.num_steps)
    row = dict(solver=solver, num_steps=opts.num_steps, nfe=nfe, batch=opts.batch, runs=[])
    for i, num_seeds in enumerate(opts.seed_count_list):
        sizes = batch_sizes(num_seeds, opts.batch)
        with_bare = i == 0 or opts.bare_all
        loops, bares = [], []
        # Alternate loop and bare runs and keep the fastest of each: load from other processes
        # only ever adds time, so the minimum is the least disturbed measurement.
        for _ in range(opts.repeats if with_bare else 1):
            outdir = tempfile.mkdtemp(prefix=f'{solver}_{num_seeds}_', dir=workdir)
            args = ['--dataset_name=cifar10', f'--seeds=0-{num_seeds - 1}', f'--batch={opts.batch}',
                    f'--solver={solver}', f'--num_steps={opts.num_steps}', f'--outdir={outdir}', f'--device={device}']
            with PeakMemory(device) as mem:
                loop_s, loop_cpu, timer = run_sample_py(model, args, sync)
            if timer.calls != nfe * len(sizes):
                raise RuntimeError(f'{solver}: sample.py made {timer.calls} denoiser calls, expected {nfe * len(sizes)}')
            written = sum(f.endswith('.png') for f in os.listdir(outdir))
            if written != num_seeds:
                raise RuntimeError(f'{solver}: sample.py wrote {written} images, expected {num_seeds}')
            loops.append(dict(loop_s=loop_s, loop_cpu_s=loop_cpu, denoiser_s=timer.seconds,
                              in_loop_overhead=(loop_s - timer.seconds) / timer.seconds, peak_mib=mem.peak,
                              after_mib=mem.after))
            if with_bare:
                with PeakMemory(device) as bare_mem:
                    bare_s, bare_cpu = run_bare(model, len(sizes), sizes, t_steps, nfe, device, sync)
                bares.append(dict(bare_s=bare_s, bare_cpu_s=bare_cpu, bare_peak_mib=bare_mem.peak))
        run = dict(seeds=num_seeds, **min(loops, key=lambda r: r['loop_s']), repeats=len(loops))
        run['peak_mib'] = max(r['peak_mib'] for r in loops)
        run['loop_img_s'] = num_seeds / run['loop_s']
        if with_bare:
            run.update(min(bares, key=lambda r: r['bare_s']))
            run.update(bare_img_s=num_seeds / run['bare_s'], ratio=run['loop_s'] / run['bare_s'],
                       cpu_ratio=min(r['loop_cpu_s'] for r in loops) / min(r['bare_cpu_s'] for r in bares),
                       all_loop_s=[r['loop_s'] for r in loops], all_bare_s=[r['bare_s'] for r in bares],
                       median_ratio=statistics.median(a['loop_s'] / b['bare_s'] for a, b in zip(loops, bares)))
        row['runs'].append(run)
        print(f'  {solver:8s} seeds={num_seeds:5d}: loop {run["loop_s"]:8.2f}s (denoiser {run["denoiser_s"]:8.2f}s)'
              + (f', bare {run["bare_s"]:8.2f}s, ratio {run["ratio"]:.4f} (median of pairs {run["median_ratio"]:.4f},'
                 f' CPU time {run["cpu_ratio"]:.4f})'
                 if 'bare_s' in run else '')
              + f', peak {run["peak_mib"]:8.1f} MiB', flush=True)
    return row


def markdown_table(rows, device_name):
    lines = [f'Device: {device_name}', '',
             '| solver | NFE | batch | seeds | loop s | bare s | loop/bare | loop/bare CPU time | in-loop overhead '
             '| img/s loop | img/s bare | peak MiB |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        for run in row['runs']:
            bare = 'bare_s' in run
            lines.append('| {} | {} | {} | {} | {:.2f} | {} | {} | {} | {:+.2%} | {:.2f} | {} | {:.0f} |'.format(
                row['solver'], row['nfe'], row['batch'], run['seeds'], run['loop_s'],
                f'{run["bare_s"]:.2f}' if bare else '-', f'{run["ratio"]:.4f}' if bare else '-',
                f'{run["cpu_ratio"]:.4f}' if bare else '-',
                run['in_loop_overhead'], run['loop_img_s'], f'{run["bare_img_s"]:.2f}' if bare else '-',
                run['peak_mib']))
    return '\n'.join(lines)


def markdown(record):
    """{key: (title, body)} from the JSON record: the table and the command that measured it."""
    fp16 = ', fp16' if record['use_fp16'] else ''
    return dict(table=(f'{record["device"]}{fp16}, torch {record["torch"]}',
                       f'`{record["command"]}`\n\n' + markdown_table(record['rows'], record['device']).split('\n\n', 1)[1]))


@click.command(context_settings=dict(show_default=True))
@click.option('--device', type=str, default=None, help='cpu or cuda [default: cuda if available]')
@click.option('--solvers', 'solver_names', type=str, default='ipndm', help='Comma-separated solvers, or "all"')
@click.option('--batch', type=click.IntRange(min=1), default=64, help='Batch size')
@click.option('--num_steps', type=click.IntRange(min=2), default=4, help='Time points (NFE = num_steps - 1 for 1-eval solvers)')
@click.option('--seed_counts', type=str, default='64,128', help='Seed counts to run (peak memory must not grow)')
@click.option('--bare_all', type=click.BOOL, default=False, help='Run the bare loop for every seed count, not only the first')
@click.option('--repeats', type=click.IntRange(min=1), default=1, help='Alternating loop/bare repetitions at the first seed count (the fastest counts)')
@click.option('--use_fp16', type=click.BOOL, default=False, help='Half-precision activations (CUDA only)')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='torch CPU threads [default: torch\'s]')
@click.option('--model_channels', type=click.IntRange(min=1), default=None, help='Override the width (smoke tests)')
@click.option('--spec', type=str, default=None, help='Spec JSON whose network_kwargs to build [default: CIFAR-10 DDPM++]')
@click.option('--out', type=str, default=None, help='JSON results [default: benchmarks/results/throughput_<device>.json]')
def main(device, solver_names, batch, num_steps, seed_counts, bare_all, repeats, use_fp16, threads, model_channels, spec, out):
    """Images per second and peak memory of sample.py's loop against bare denoiser calls."""
    opts = dnnlib.EasyDict(batch=batch, num_steps=num_steps, bare_all=bare_all, repeats=repeats)
    try:
        opts.seed_count_list = misc.parse_int_list(seed_counts)
    except ValueError as e:
        raise UserError(f'--seed_counts: {e}') from None
    names = list(solvers.SOLVERS) if solver_names == 'all' else [s.strip() for s in solver_names.split(',')]
    unknown = [s for s in names if s not in solvers.SOLVERS]
    if unknown:
        raise UserError(f'--solvers: unknown {", ".join(unknown)}; choose from {", ".join(solvers.SOLVERS)} or all')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads:
        torch.set_num_threads(threads)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    torch.backends.cudnn.benchmark = False          # as sample.py

    model, kwargs = build_model(device, use_fp16=use_fp16, model_channels=model_channels, spec=spec)
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads'
    params = sum(p.numel() for p in model.net.parameters())
    print(f'{device_name}; SongUNet {params / 1e6:.1f} M parameters, batch {batch}, fp16={use_fp16}', flush=True)
    with torch.no_grad():                           # first call allocates and warms up kernels
        model.denoise(torch.zeros([batch, *model.shape], device=device), 1.0)

    rows = []
    with tempfile.TemporaryDirectory(prefix='throughput_') as workdir:
        for solver in names:
            rows.append(benchmark_solver(model, solver, opts, device, sync, workdir))
    table = markdown_table(rows, device_name)
    print()
    print(table)
    record = dict(device=device_name, torch=torch.__version__, threads=torch.get_num_threads(), params=params,
                  network_kwargs=kwargs, use_fp16=use_fp16, command=' '.join(sys.argv), rows=rows, table=table)
    out = out or os.path.join(ROOT, 'benchmarks', 'results', f'throughput_{device.type}.json')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    misc.atomic_write_json(out, record)
    render.write_markdown(out, markdown)
    print(f'\nWrote {out} and its markdown (.md)')


if __name__ == '__main__':
    dnnlib.run_cli(main)
