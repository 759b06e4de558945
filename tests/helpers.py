"""Shared test utilities: run the CLIs in a subprocess or in this process, and check the one-line
error contract."""

import contextlib
import io
import os
import subprocess
import sys

from conftest import ROOT


def run_cli(script, *args, env=None, timeout=600, cwd=None):
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def run_here(command, *args, cwd=None):
    """A CLI's click command run in this process through dnnlib.run_cli, as the script runs it
    (skips the seconds of a fresh interpreter). Returns a CompletedProcess like run_cli's; an
    exception that run_cli lets through (a traceback, in a real run) fails the calling test."""
    import dnnlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:          # contextlib.chdir needs Python 3.11
            stack.callback(os.chdir, os.getcwd())
            os.chdir(cwd)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            dnnlib.run_cli(command, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(['run_here', *map(str, args)], code, out.getvalue(), err.getvalue())


def listing(folder):
    """Every path under `folder` (files and folders), relative, for 'nothing was written' checks."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder) for n in dirs + files)


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
