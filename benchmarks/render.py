"""Regenerate every benchmarks/results/*.md from the committed JSON results, and the tables that
README.md and docs/*.md copy from them, without measuring anything.

    python benchmarks/render.py            # rewrite what differs, list what it wrote
    python benchmarks/render.py --check    # write nothing; exit 1 naming every stale file

Each results file `<stem>.json` is rendered by the `markdown(record) -> {key: (title, body)}`
function of the benchmark script that wrote it (SCRIPTS, by the longest matching stem prefix)
into `<stem>.md`: one `### title` per section, each preceded by `<!-- section:key -->`.
A page quotes a section between two marker comments, and this script keeps the copy equal to
the section's body (a hand edit or a stale table is overwritten here, and fails tests/test_docs.py):

    <!-- table:results/gits.md#headline -->
    ...
    <!-- /table -->
"""

import glob
import importlib.util
import json
import os
import re
import sys

import click

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, 'results')

SCRIPTS = {        # stem prefix of a results JSON -> the benchmark script that renders it
    'gits': 'gits.py',
    'solvers': 'solvers.py',
    'compat': 'compat.py',
    'presets': 'presets.py',
    'search_cost': 'search_cost.py',
    'throughput': 'throughput.py',
    'trajectory_figures': 'trajectory_figures.py',
}

BLOCK = re.compile(r'(<!-- table:(\S+?)#(\S+?) -->\n)(.*?)(<!-- /table -->)', re.DOTALL)
SECTION = '<!-- section:{key} -->'


def sig3(value):
    """Three significant digits, trailing zeros kept (0.380, not 0.38), as the docs' tables print them."""
    return f'{value:#.3g}'.rstrip('.')


def sections_text(sections):
    """The markdown file of one results JSON: its sections in order, each with its marker."""
    return '\n\n'.join(f'{SECTION.format(key=key)}\n### {title}\n\n{body.strip()}'
                       for key, (title, body) in sections.items()) + '\n'


def write_markdown(json_path, markdown):
    """Called by a benchmark after writing its JSON: <stem>.md rendered from the JSON as written,
    so that it equals what this script renders later. Returns the text."""
    with open(json_path, encoding='utf-8') as f:
        text = sections_text(markdown(json.load(f)))
    md = os.path.splitext(json_path)[0] + '.md'
    md = md if md != json_path else json_path + '.md'        # --out=x.md must not lose the JSON
    tmp = os.path.join(os.path.dirname(os.path.abspath(md)), f'.{os.path.basename(md)}.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, md)
    return text


def script_for(stem):
    matches = [p for p in SCRIPTS if stem == p or stem.startswith(p + '_')]
    if not matches:
        raise KeyError(f'benchmarks/results/{stem}.json: no benchmark script renders it (add it to SCRIPTS)')
    return SCRIPTS[max(matches, key=len)]


def load_script(name):
    """A benchmark script as a module, under its own name (benchmarks/gits.py is not gits.py)."""
    module = sys.modules.get(f'bench_{name[:-3]}')
    if module is None:
        if BENCH not in sys.path:             # the scripts import their neighbours (render, analytic);
            sys.path.append(BENCH)            # last, so that gits, solvers stay the project's modules
        spec = importlib.util.spec_from_file_location(f'bench_{name[:-3]}', os.path.join(BENCH, name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def rendered_sections():
    """{results md file name: {key: (title, body)}} for every committed JSON results file."""
    out = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, '*.json'))):
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding='utf-8') as f:
            out[f'{stem}.md'] = load_script(script_for(stem)).markdown(json.load(f))
    return out


def refresh_blocks(text, sections, where):
    """`text` with every marked block replaced by the section it names."""
    def body(m):
        name, key = m.group(2), m.group(3)
        md = name[len('results/'):] if name.startswith('results/') else None
        if md not in sections or key not in sections[md]:
            raise KeyError(f'{where}: the block "{name}#{key}" names no rendered section')
        return m.group(1) + sections[md][key][1].strip() + '\n' + m.group(5)
    return BLOCK.sub(body, text)


def doc_pages():
    return [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def expected_files():
    """{path: text} of every file this script writes: the results markdown and the pages."""
    sections = rendered_sections()
    files = {os.path.join(RESULTS, md): sections_text(s) for md, s in sections.items()}
    for page in doc_pages():
        with open(page, encoding='utf-8') as f:
            files[page] = refresh_blocks(f.read(), sections, os.path.relpath(page, ROOT))
    return files


def stale_files():
    """{path: expected text} of the files whose content differs from what the JSON renders."""
    stale = {}
    for path, text in expected_files().items():
        current = open(path, encoding='utf-8').read() if os.path.exists(path) else None
        if current != text:
            stale[path] = text
    return stale


@click.command()
@click.option('--check', is_flag=True, help='Write nothing; exit 1 if a file is stale')
def main(check):
    """Render benchmarks/results/*.md and the quoted tables from the committed JSON."""
    try:
        stale = stale_files()
    except KeyError as e:            # a results file without a renderer, a block naming no section
        raise click.ClickException(e.args[0]) from None
    for path, text in stale.items():
        if not check:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
        print(f'{"stale" if check else "wrote"} {os.path.relpath(path, ROOT)}')
    if check and stale:
        sys.exit(1)


if __name__ == '__main__':
    main()
