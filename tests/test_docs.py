"""The README and docs/ stay a map whose numbers are traceable: the README is small, every
relative link resolves, every measured table is the one the committed JSON renders, and every
decimal number in the prose comes from a results file (or is a documented constant)."""

import glob
import os
import re

import pytest

from helpers import ROOT

import importlib.util

_spec = importlib.util.spec_from_file_location('bench_render', os.path.join(ROOT, 'benchmarks', 'render.py'))
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)

README = os.path.join(ROOT, 'README.md')
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
README_LIMIT = 20_000          # bytes: the README is a map; details live in docs/

# Decimal numbers that are documented constants, not measurements, with where each is defined.
# (Constants that a results file records, such as --coeff's 1.15 or sigma_min 0.002, need no entry;
# test_allow_list_is_used keeps this list to what the pages use.)
ALLOWED = {
    '3.10': 'the oldest Python supported',
    '0.995': 'the quantile of dynamic thresholding (solvers.py)',
    '0.0020132': "the official float32 time_uniform schedule's last point (tests/test_compat.py)",
    '1.20': "gits_sd15's default coeff, the official Stable Diffusion recipe's",
    '0.80': "the lowest coeff of ComfyUI's GITS table (schedule_presets.py)",
    '1.50': "the highest coeff of ComfyUI's GITS table (schedule_presets.py)",
    '1.0': "imagenet256's default classifier-guidance rate",
    '157.4': "imagenet256's sigma_max from its betas (tests/test_adm.py)",
    '0.5': "EDM's sigma_data, in lsun_bedroom's preconditioning",
    '2.5': "gmm_wavelet's coarsest wavelet standard deviation (models/analytic.py)",
    '0.1': 'below sigma 1 a gmm slope turns by under 0.1 degree (tests/test_analytic.py)',
}

FENCE = re.compile(r'^```.*?^```', re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r'`[^`\n]*`')
URL = re.compile(r'https?://\S+?(?=[)\s>]|$)')
# A decimal number standing alone: not part of a name (v1.5), a path or URL (arXiv:2405.11326),
# or a dotted version (0.42.1, skipped below).
NUMBER = re.compile(r'(?<![\w.:/])\d+(?:\.\d+)+(?![\w])')
LINK = re.compile(r'\]\(([^)\s]+)\)|<img [^>]*src="([^"]+)"')


def read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def prose(text):
    """The page without fenced code blocks, inline code spans and URLs; ranges (0.01..157.4)
    split into their two ends."""
    return URL.sub('', CODE_SPAN.sub('', FENCE.sub('', text))).replace('..', ' .. ')


def decimals(text):
    return {n for n in NUMBER.findall(prose(text)) if n.count('.') == 1}


def results_numbers():
    """Every decimal number written in a committed results file (JSON or markdown)."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, 'benchmarks', 'results', '*')):
        found |= set(re.findall(r'\d+\.\d+', read(path)))
    return found


def unbacked(text, backed):
    return sorted(n for n in decimals(text) if n not in backed and n not in ALLOWED)


def broken_links(path):
    base = os.path.dirname(path)
    out = []
    for m in LINK.finditer(read(path)):
        target = m.group(1) or m.group(2)
        if re.match(r'[a-z]+:', target) or target.startswith('#'):
            continue                       # a URL, a mail address, an anchor on the same page
        if not os.path.exists(os.path.normpath(os.path.join(base, target.split('#')[0]))):
            out.append(target)
    return out


def test_readme_is_small():
    assert os.path.getsize(README) < README_LIMIT


@pytest.mark.parametrize('path', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('[ok](page.md) [gone](missing.md#x) [web](https://example.com/x.md) ![i](img/none.png)\n')
    assert broken_links(str(page)) == ['missing.md#x', 'img/none.png']


def test_rendered_files_match_committed_json():
    """benchmarks/results/*.md and every marked table equal what the JSON renders."""
    stale = [os.path.relpath(p, ROOT) for p in render.stale_files()]
    assert stale == [], 'stale (run python benchmarks/render.py, or fix the hand edit): ' + ', '.join(stale)


def test_pages_quote_tables():
    """The measured tables of the README and the results page are copies, not retyped."""
    for page in (README, os.path.join(ROOT, 'docs', 'results.md')):
        assert render.BLOCK.search(read(page)), page


def test_stale_or_edited_table_is_caught():
    """A hand edit inside a marked block, or a block naming no section, does not survive."""
    sections = render.rendered_sections()
    text = read(README)
    m = render.BLOCK.search(text)
    assert m is not None
    edited = text[:m.start(4)] + m.group(4).replace('0.', '9.', 1) + text[m.end(4):]
    assert edited != text
    assert render.refresh_blocks(edited, sections, 'README.md') == text
    with pytest.raises(KeyError):
        render.refresh_blocks('<!-- table:results/gits.md#no-such -->\n<!-- /table -->', sections, 'x')


@pytest.mark.parametrize('path', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_decimal_numbers_come_from_results(path):
    assert unbacked(read(path), results_numbers()) == []


def test_number_check_rejects_typed_numbers():
    """Numbers typed into prose fail unless a results file holds them; code, URLs, names and
    versions are not numbers of the text; the allow-list is explicit."""
    text = ('On 2 cores the command takes 2.7 s (RMSE 0.19 vs 0.44), +15.3% overhead.\n'
            '```\nSearch evaluations 0.07373\n```\n`--t_steps=[80,10.9836]` SD v1.5, diffusers 0.42.1, '
            '[arXiv:2405.11326](https://arxiv.org/abs/2405.11326), Python 3.10, sigma 0.0123..45.67\n')
    assert unbacked(text, set()) == ['0.0123', '0.19', '0.44', '15.3', '2.7', '45.67']
    assert unbacked(text, {'0.19', '0.44', '2.7', '0.0123', '45.67'}) == ['15.3']


def test_allow_list_is_used():
    used = set().union(*(decimals(read(p)) for p in PAGES))
    assert sorted(set(ALLOWED) - used) == []
