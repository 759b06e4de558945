"""The module graph: no project module imports the CLI (sample.py), and imports form no cycle."""

import ast
import os

from conftest import ROOT

CLI_SCRIPTS = ('sample', 'fid', 'clip_score', 'trajectory')


def project_modules():
    """{module name: path} for every Python file of the project outside tests/."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', '__pycache__', 'samples', 'src')]
        for f in files:
            if f.endswith('.py'):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, '.')
                out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(folder, f)
    return out


def imports_of(path, modules):
    """Project modules that the file imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition('.')[0]
            if name:
                found.add(name)
    return found


def graph():
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_graph_sees_the_known_edges():
    g = graph()            # guards the scanner itself: these edges exist, so it must find them
    assert 'gits' in g['sample'] | g['run_schedule'] and 'solvers' in g['gits']
    assert 'torch_utils.seeds' in g['run_schedule']


def test_no_module_imports_a_cli_script():
    g = graph()
    bad = sorted((m, c) for m, deps in g.items() for c in deps if c in CLI_SCRIPTS)
    assert not bad, f'modules that import a command-line script: {bad}'


def test_no_import_cycle():
    g = graph()
    state = {}

    def visit(m, stack):
        state[m] = 'open'
        for d in sorted(g.get(m, ())):
            if state.get(d) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 'done'

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
