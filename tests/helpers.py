"""Shared test utilities: run the CLIs in a subprocess and check the one-line error contract."""

import os
import subprocess
import sys

from conftest import ROOT


def run_cli(script, *args, env=None, timeout=600, cwd=None):
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def torchrun(script, nproc, *args, timeout=600, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(result, flag):
    """Non-zero exit, stderr is exactly one line that starts with 'Error:' and names `flag`."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('Error:'), lines[0]
    assert flag in lines[0], lines[0]
    assert 'Traceback' not in result.stderr
