"""CLIP score of generated images against their prompts, as the GITS paper reports it for
Stable Diffusion: 100 * cos(image embedding, text embedding), averaged over the images, with
open_clip's ViT-g-14 (laion2b_s34b_b88k).

    python clip_score.py calc --images=samples/ms_coco/ipndm_nfe6
    python clip_score.py calc --images=PATH --prompts=captions.txt
    torchrun --standalone --nproc_per_node=4 clip_score.py calc --images=PATH

Prompts: sample.py records each image's prompt as <seed>.json ({"prompt": ...}) next to
<seed:06d>.png, and that is used by default. With --prompts=FILE, prompt i belongs to seed i
(the seed being the image's file name, as sample.py writes it), the same rule as sample.py's
--prompt_file: one prompt a line, MS-COCO captions JSON, or a CSV with a `text` column.

Definition: the paper's code takes the plain cosine (no clamp at 0, unlike torchmetrics'
100 * max(cos, 0)); for real CLIP models and matching prompts the cosine is positive, so both
agree in practice.
"""

import json
import os
import posixpath

import click
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import image_folder
from torch_utils.prompts import read_prompt_file

DEFAULT_MODEL = 'ViT-g-14'
DEFAULT_PRETRAINED = 'laion2b_s34b_b88k'


def cache_dir():
    """open_clip's downloads: <GITS_CACHE_DIR or ~/.cache/gits>/open_clip."""
    return os.path.join(dnnlib.util.default_cache_dir(), 'open_clip')


# ----------------------------------------------------------------------------------------------
# Prompts.

def image_seed(name):
    """The seed of an image named <seed>.png (sample.py writes <seed:06d>.png), else None."""
    stem = posixpath.splitext(posixpath.basename(name))[0]
    return int(stem) if stem.isdigit() else None


def prompts_from_file(folder, indices, path):
    prompts = read_prompt_file(dist.fetch_file(path, '--prompts', cache_dir()), flag='--prompts')
    out = []
    for i in indices:
        name = folder.names[i]
        seed = image_seed(name)
        if seed is None:
            raise UserError(f'--prompts: cannot pair image "{name}" with a prompt: prompt i belongs to seed i, '
                            f'and the image is not named <seed>.png as sample.py names it')
        if seed >= len(prompts):
            raise UserError(f'--prompts: image "{name}" is seed {seed}, but "{path}" holds only {len(prompts)} '
                            f'prompts (prompt i belongs to seed i); prompts and images do not pair up')
        if not prompts[seed]:
            raise UserError(f'--prompts: the prompt of seed {seed} (for image "{name}") is empty')
        out.append(prompts[seed])
    return out


def prompts_from_json(folder, indices):
    """The prompt sample.py recorded next to each image as <seed>.json {"prompt": ...}."""
    out = []
    for i in indices:
        name = folder.names[i]
        side = posixpath.splitext(name)[0] + '.json'
        if side not in folder.files:
            raise UserError(f'--images: no prompt for image "{name}": "{side}" is missing; record prompts '
                            f'with sample.py or pass --prompts=FILE')
        try:
            info = json.loads(folder.read(side).decode('utf-8'))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f'--images: "{side}" is not valid JSON ({e})') from None
        prompt = info.get('prompt') if isinstance(info, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f'--images: "{side}" has no "prompt" text for image "{name}"')
        out.append(prompt.strip())
    return out


# ----------------------------------------------------------------------------------------------
# Model.

def load_clip(model_name, pretrained, device):
    """(model, preprocess, tokenizer). `model_name`: an open_clip name (ViT-g-14, hf-hub:...,
    local-dir:...) or the path of an open_clip model config .json. `pretrained`: an open_clip
    tag, a checkpoint file, or a URL of one (downloaded into cache_dir())."""
    import open_clip

    name = model_name
    if model_name.lower().endswith('.json'):
        if not os.path.isfile(model_name):
            raise UserError(f'--model: config file "{model_name}" not found')
        open_clip.add_model_config(model_name)      # registered under the file's stem
        name = os.path.splitext(os.path.basename(model_name))[0]
    preprocess_kw = {}
    if pretrained and dnnlib.util.is_url(pretrained):
        pretrained = dist.resolve_file(pretrained, '--pretrained', cache_dir())   # inside dist.rank0_first
    elif pretrained and not os.path.isfile(pretrained) and open_clip.get_pretrained_cfg(name, pretrained):
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        cached = cached_tag_file(cfg)
        if cached is not None:     # the file itself, so that open_clip makes no network request
            pretrained, preprocess_kw = cached, tag_preprocess(cfg)
        else:
            check_hub_reachable(name, pretrained, cfg)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, cache_dir=cache_dir(), **preprocess_kw)
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir())
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f'--model/--pretrained: cannot load CLIP "{model_name}" with weights "{pretrained}" ({reason})') from None
    return model.eval(), preprocess, tokenizer


def tag_files(cfg):
    """(Hugging Face repo or None, [file names in open_clip's order of preference], URL) of the
    weights of an open_clip pretrained tag's config."""
    from open_clip import pretrained as oc_pretrained
    hub = cfg.get('hf_hub', '')
    if hub:
        repo, filename = os.path.split(hub)       # 'org/name/' -> the default file name
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        names = list(oc_pretrained._get_safe_alternatives(filename)) + [filename]
        import huggingface_hub
        return repo, names, huggingface_hub.hf_hub_url(repo, filename)
    url = cfg.get('url', '')
    return None, [os.path.basename(url)], url


def cached_tag_file(cfg):
    """The local weights file of a pretrained tag if open_clip's download is in cache_dir()
    (Hugging Face's cache layout, or the URL's file name), else None. No network access."""
    repo, names, _ = tag_files(cfg)
    if repo is None:
        path = os.path.join(cache_dir(), names[0])
        return path if names[0] and os.path.isfile(path) else None
    import huggingface_hub
    for name in names:
        path = huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir())
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def tag_preprocess(cfg):
    """The image preprocessing a pretrained tag sets (open_clip applies it for a tag, not for a file)."""
    keys = dict(mean='image_mean', std='image_std', interpolation='image_interpolation', resize_mode='image_resize_mode')
    return {arg: cfg[key] for key, arg in keys.items() if cfg.get(key) is not None}


def check_hub_reachable(model_name, tag, cfg, timeout=10):
    """Weights that are not cached must be downloaded: fail in one line at once when their host does
    not answer, instead of open_clip's minute of retries and dozens of warnings."""
    import requests
    import urllib.parse
    repo, _, file_url = tag_files(cfg)
    host = urllib.parse.urlsplit(file_url)
    try:
        requests.head(f'{host.scheme}://{host.netloc}', timeout=timeout)
    except requests.RequestException as e:
        where = f'a Hugging Face cache of {repo}' if repo else 'the file'
        raise UserError(f'--pretrained: the weights "{tag}" of {model_name} are not in {cache_dir()} and '
                        f'{host.netloc} cannot be reached ({dnnlib.util.failure_reason(e)}); download {file_url} '
                        f'and pass --pretrained=FILE, or put {where} in {cache_dir()}') from None


def score_fn(model, tokenizer, prompts, device):
    """fn(images, indices) -> per-image scores 100 * cos(image, text), float64 on the CPU.
    `prompts[k]` is the prompt of dataset index k."""
    def fn(images, indices):
        with torch.no_grad():
            img = model.encode_image(images.to(device)).float()
            txt = model.encode_text(tokenizer([prompts[i] for i in indices]).to(device)).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).double().cpu()
    return fn


def clip_score(folder, indices, prompts, model, preprocess, tokenizer, device, batch=64, workers=3):
    """Mean CLIP score of folder images `indices` (prompts[k] for image k of `indices`), summed in
    float64 in image order on rank 0 (None elsewhere)."""
    by_index = dict(zip(indices, prompts))
    dataset = image_folder.ImageDataset(folder, transform=preprocess)
    scores = []
    fn = score_fn(model, tokenizer, by_index, device)
    for _, s in image_folder.gathered(dataset, image_folder.split_batches(indices, batch), fn,
                                      workers=workers, desc='CLIP'):
        scores.append(s)
    return float(torch.cat(scores).sum() / len(indices)) if dist.get_rank() == 0 else None


# ----------------------------------------------------------------------------------------------

@click.group()
def main():
    """CLIP score of images against their prompts."""


@main.command()
@click.option('--images', type=str, required=True, help='Folder (searched recursively) or zip of PNG/JPEG images')
@click.option('--prompts', type=str, default=None, help='Prompt file (path or URL); prompt i for seed i [default: <seed>.json beside each image]')
@click.option('--model', type=str, default=DEFAULT_MODEL, help='open_clip model name, hf-hub:/local-dir: id, or model config .json')
@click.option('--pretrained', type=str, default=DEFAULT_PRETRAINED, help='open_clip weights tag, checkpoint file or URL')
@click.option('--num', type=click.IntRange(min=1), default=None, help='Use a random subset of this many images (chosen by --seed) [default: all]')
@click.option('--seed', type=int, default=0, help='Seed of the random subset')
@click.option('--batch', type=click.IntRange(min=1), default=64, help='Images per CLIP call and process')
@click.option('--workers', type=click.IntRange(min=0), default=3, help='Image-decoding worker processes per process')
@click.option('--device', type=str, default=None, help='torch device [default: cuda if available, else cpu]')
def calc(images, prompts, model, pretrained, num, seed, batch, workers, device):
    """Mean CLIP score (printed as the last line)."""
    dist.check_device(device)
    folder = image_folder.ImageFolder(images, flag='--images')
    indices = image_folder.select(len(folder), num, seed)
    device = dist.init(device)
    texts = prompts_from_file(folder, indices, prompts) if prompts else prompts_from_json(folder, indices)
    dist.print0(f'Loading CLIP {model} ({pretrained})...')
    net, preprocess, tokenizer = dist.rank0_first(lambda: load_clip(model, pretrained, device))
    dist.print0(f'Scoring {len(indices)} images from "{images}"...')
    score = clip_score(folder, indices, texts, net, preprocess, tokenizer, device, batch=batch, workers=workers)
    if dist.get_rank() == 0:
        print(f'{score:.6f}', flush=True)
    dist.barrier()
    dist.shutdown()


if __name__ == '__main__':
    dnnlib.run_cli(main)
