"""clip_score.py on a tiny random-weight open_clip model (a custom config + a checkpoint file):
the score equals a direct computation, prompts pair with images by seed, the weights download
into the cache, and mismatched prompts fail with one line."""

import http.server
import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import clip_score
import dnnlib
from helpers import assert_one_line_error, run_cli, torchrun
from torch_utils.prompts import read_prompt_file

PROMPTS = ['a red car', 'a cat on a sofa', 'two birds in the sky', 'a bowl of fruit', 'snowy mountains',
           'an old bicycle', 'a lighthouse at night', 'green apples', 'a city street', 'a small boat']

TINY_CONFIG = {
    'embed_dim': 16,
    'vision_cfg': {'image_size': 16, 'layers': 1, 'width': 32, 'head_width': 16, 'patch_size': 8},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1},
}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(config path, checkpoint path) of a random-weight CLIP in open_clip's own format."""
    import open_clip
    folder = tmp_path_factory.mktemp('clip')
    config = folder / 'tiny-clip.json'
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-clip')
    ckpt = folder / 'tiny-clip.pt'
    torch.save(model.state_dict(), ckpt)
    return config, ckpt


def make_samples(folder, seeds, record=True, size=(20, 14)):
    """Images named as sample.py names them, with <seed>.json {'prompt': ...} beside them."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for s in seeds:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f'{s:06d}.png')
        if record:
            (folder / f'{s:06d}.json').write_text(json.dumps({'prompt': PROMPTS[s]}))


def direct_score(tiny, folder, seeds, prompts):
    """100 * cos(image, text) averaged, computed here image by image with open_clip."""
    import open_clip
    config, ckpt = tiny
    model, _, preprocess = open_clip.create_model_and_transforms('tiny-clip', pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer('tiny-clip')
    scores = []
    with torch.no_grad():
        for s in seeds:
            img = model.encode_image(preprocess(Image.open(folder / f'{s:06d}.png'))[None])
            txt = model.encode_text(tokenizer([prompts[s]]))
            scores.append(100 * torch.nn.functional.cosine_similarity(img, txt).item())
    return float(np.mean(scores))


def clip_here(capsys, *args):
    """clip_score.py's command line in this process (open_clip takes seconds to import)."""
    capsys.readouterr()
    try:
        # On the CPU like the independent computations here, also on a machine with a GPU.
        dnnlib.run_cli(clip_score.main, [str(a) for a in args] + ['--device=cpu'])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def printed_score(result):
    code, out, err = result
    assert code == 0, out + err
    return float(out.strip().splitlines()[-1])


def test_score_matches_direct_computation(tmp_path, tiny, capsys):
    config, ckpt = tiny
    seeds = [0, 2, 3, 5, 7]
    make_samples(tmp_path / 'imgs', seeds)
    expected = direct_score(tiny, tmp_path / 'imgs', seeds, PROMPTS)
    got = printed_score(clip_here(capsys, 'calc', f'--images={tmp_path / "imgs"}', f'--model={config}',
                                  f'--pretrained={ckpt}', '--batch=2', '--workers=0'))
    # float32 embeddings in batches of 2 vs 1 and the 6 printed decimals: ~1e-5.
    assert got == pytest.approx(expected, abs=5e-5)
    # Wrong prompts give another score (the pairing matters).
    shuffled = {s: PROMPTS[(s + 1) % len(PROMPTS)] for s in seeds}
    assert abs(direct_score(tiny, tmp_path / 'imgs', seeds, shuffled) - expected) > 1e-3


def test_two_processes_print_the_same_score(tmp_path, tiny, capsys):
    """Batches of 2 over 2 processes: each rank must pair its own images with their prompts."""
    config, ckpt = tiny
    make_samples(tmp_path / 'imgs', [0, 1, 3, 4, 9])
    args = ['calc', f'--images={tmp_path / "imgs"}', f'--model={config}', f'--pretrained={ckpt}', '--batch=2',
            '--workers=0']
    one = printed_score(clip_here(capsys, *args))
    r = torchrun('clip_score.py', 2, *args, '--device=cpu')
    assert r.returncode == 0, r.stdout + r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) == one


def test_prompt_file_pairs_by_seed(tmp_path, tiny, capsys):
    config, ckpt = tiny
    seeds = [4, 6, 9]
    make_samples(tmp_path / 'imgs', seeds, record=False)
    (tmp_path / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    coco = {'annotations': [{'image_id': 100 + i, 'id': i, 'caption': p + ' '} for i, p in enumerate(PROMPTS)]}
    (tmp_path / 'captions.json').write_text(json.dumps(coco))
    expected = direct_score(tiny, tmp_path / 'imgs', seeds, PROMPTS)
    for name in ('prompts.txt', 'captions.json'):
        got = printed_score(clip_here(capsys, 'calc', f'--images={tmp_path / "imgs"}', f'--prompts={tmp_path / name}',
                                      f'--model={config}', f'--pretrained={ckpt}', '--workers=0'))
        assert got == pytest.approx(expected, abs=5e-5), name


def test_read_prompt_file_forms(tmp_path):
    (tmp_path / 'p.txt').write_text('a cat\n\nlast one\n\n')
    assert read_prompt_file(tmp_path / 'p.txt') == ['a cat', '', 'last one']
    (tmp_path / 'p.csv').write_text('id,text\n1,"a cat, sitting"\n2,dog\n')
    assert read_prompt_file(tmp_path / 'p.csv') == ['a cat, sitting', 'dog']
    (tmp_path / 'p.json').write_text(json.dumps(['x', ' y ']))
    assert read_prompt_file(tmp_path / 'p.json') == ['x', 'y']
    (tmp_path / 'bad.json').write_text(json.dumps({'images': []}))
    with pytest.raises(dnnlib.UserError, match='--prompt_file'):
        read_prompt_file(tmp_path / 'bad.json')


def test_mismatched_prompts_fail_clearly(tmp_path, tiny, capsys):
    config, ckpt = tiny
    model = [f'--model={config}', f'--pretrained={ckpt}', '--workers=0']
    make_samples(tmp_path / 'imgs', [1, 8])
    (tmp_path / 'short.txt').write_text('\n'.join(PROMPTS[:5]))       # seed 8 has no prompt
    make_samples(tmp_path / 'norec', [1, 2], record=False)
    (tmp_path / 'named').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'named' / 'cat.png')
    cases = [
        ([f'--images={tmp_path / "imgs"}', f'--prompts={tmp_path / "short.txt"}'], '--prompts'),
        ([f'--images={tmp_path / "norec"}'], '--images'),                                   # no <seed>.json
        ([f'--images={tmp_path / "named"}', f'--prompts={tmp_path / "short.txt"}'], '--prompts'),
        ([f'--images={tmp_path / "imgs"}', f'--prompts={tmp_path / "none.txt"}'], '--prompts'),
    ]
    for args, flag in cases:
        code, out, err = clip_here(capsys, 'calc', *args, *model)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith('Error: ' + flag), err
    # The real entry point, and an unknown model name.
    r = run_cli('clip_score.py', 'calc', f'--images={tmp_path / "imgs"}', f'--prompts={tmp_path / "short.txt"}', *model)
    assert_one_line_error(r, '--prompts')
    assert 'seed 8' in r.stderr
    code, out, err = clip_here(capsys, 'calc', f'--images={tmp_path / "imgs"}', '--model=No-Such-Model', '--workers=0')
    assert code == 2 and err.startswith('Error: --model') and len(err.strip().splitlines()) == 1, err


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_weights_download_into_cache(tmp_path, tiny, capsys, monkeypatch):
    config, ckpt = tiny
    root = tmp_path / 'www'
    root.mkdir()
    (root / 'tiny-clip.pt').write_bytes(ckpt.read_bytes())
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), lambda *a, **k: _Handler(*a, directory=str(root), **k))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv('GITS_CACHE_DIR', str(tmp_path / 'cache'))
        make_samples(tmp_path / 'imgs', [0, 1, 2])
        url = f'http://127.0.0.1:{httpd.server_address[1]}/tiny-clip.pt'
        got = printed_score(clip_here(capsys, 'calc', f'--images={tmp_path / "imgs"}', f'--model={config}',
                                      f'--pretrained={url}', '--workers=0'))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert os.listdir(tmp_path / 'cache' / 'open_clip') == ['tiny-clip.pt']
    assert got == pytest.approx(direct_score(tiny, tmp_path / 'imgs', [0, 1, 2], PROMPTS), abs=5e-5)
    assert clip_score.DEFAULT_MODEL == 'ViT-g-14' and clip_score.DEFAULT_PRETRAINED == 'laion2b_s34b_b88k'


def test_offline_without_cached_weights_fails_at_once(tmp_path):
    """No cached weights and no network (an endpoint that refuses connections): one line that says
    where the weights go or how to pass them, without Hugging Face's retries."""
    make_samples(tmp_path / 'imgs', [0])
    r = run_cli('clip_score.py', 'calc', f'--images={tmp_path / "imgs"}', '--device=cpu',
                env=dict(GITS_CACHE_DIR=str(tmp_path / 'cache'), HF_ENDPOINT='http://127.0.0.1:9'))
    assert_one_line_error(r, '--pretrained')
    assert '--pretrained=FILE' in r.stderr and str(tmp_path / 'cache' / 'open_clip') in r.stderr
    assert 'Retry' not in r.stdout + r.stderr
    assert not (tmp_path / 'cache').exists()


def test_cached_tag_weights_load_without_network(tmp_path, tiny, capsys, monkeypatch):
    """A pretrained tag whose file is in the cache (Hugging Face's layout) is read from there with
    no network request: the tag's repository does not exist, so any request would fail."""
    from open_clip import pretrained as oc_pretrained
    config, ckpt = tiny
    monkeypatch.setenv('GITS_CACHE_DIR', str(tmp_path / 'cache'))
    def no_network(*args, **kwargs):
        raise AssertionError('open_clip asked the Hugging Face hub although the weights are cached')

    monkeypatch.setattr(oc_pretrained, 'hf_hub_download', no_network)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, 'tiny-clip', {'testtag': dict(
        hf_hub='gits-tests/no-such-repo/', mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))})
    repo = tmp_path / 'cache' / 'open_clip' / 'models--gits-tests--no-such-repo'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('0123456789abcdef')
    (repo / 'snapshots' / '0123456789abcdef').mkdir(parents=True)
    (repo / 'snapshots' / '0123456789abcdef' / 'open_clip_pytorch_model.bin').write_bytes(ckpt.read_bytes())
    make_samples(tmp_path / 'imgs', [0, 1, 2])
    got = printed_score(clip_here(capsys, 'calc', f'--images={tmp_path / "imgs"}', f'--model={config}',
                                  '--pretrained=testtag', '--workers=0'))
    assert got == pytest.approx(direct_score(tiny, tmp_path / 'imgs', [0, 1, 2], PROMPTS), abs=5e-5)
