"""CLIP text encoder (the transformers `CLIPTextModel` that SD v1 wraps as FrozenCLIPEmbedder),
written anew with the key layout of the SD checkpoint (`text_model.embeddings...`, after the
checkpoint's `cond_stage_model.transformer.` prefix), and its tokenisation.

The conditioning SD was trained with is `last_hidden_state` (after the final LayerNorm) of the
token ids padded to 77 with the end-of-text id (not zeros) under a causal mask only.
Tokenisation uses open_clip's bundled BPE vocabulary (`open_clip.tokenizer.SimpleTokenizer`),
which works offline; the ids are those of openai/clip-vit-large-patch14.
"""

import dataclasses
import functools
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


ACTIVATIONS = {
    'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x),
    'gelu': F.gelu,
}


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, -1).transpose(1, 2)
        h = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=True)
        return self.out_proj(h.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(positions)[None]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """`forward(input_ids [B, L]) -> last_hidden_state [B, L, hidden]`."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids):
        return self.text_model(input_ids)


def infer_config(state_dict, **overrides):
    """CLIPTextConfig from the shapes of a `text_model.*` state dict. The head count cannot be
    read from shapes: it defaults to hidden_size / 64 (ViT-L/14: 12) unless given."""
    emb = state_dict['text_model.embeddings.token_embedding.weight']
    pos = state_dict['text_model.embeddings.position_embedding.weight']
    layers = {int(k.split('.')[3]) for k in state_dict if k.startswith('text_model.encoder.layers.')}
    fc1 = state_dict['text_model.encoder.layers.0.mlp.fc1.weight']
    d = dict(vocab_size=emb.shape[0], hidden_size=emb.shape[1], max_position_embeddings=pos.shape[0],
             num_hidden_layers=len(layers), intermediate_size=fc1.shape[0],
             num_attention_heads=max(1, emb.shape[1] // 64))
    d.update(overrides)
    return CLIPTextConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------
# Tokenisation.

def _tokenizer_module():
    """open_clip's tokenizer module. It is self-contained (ftfy, regex, its bundled vocabulary), so
    it is loaded from the package folder without running open_clip/__init__, which imports
    torchvision and every model definition (seconds per process) for nothing here."""
    if 'open_clip.tokenizer' in sys.modules:
        return sys.modules['open_clip.tokenizer']
    try:
        folder = importlib.util.find_spec('open_clip').submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location('_open_clip_tokenizer', os.path.join(folder, 'tokenizer.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:       # a different package layout: the ordinary (slower) import
        return importlib.import_module('open_clip.tokenizer')


@functools.lru_cache(maxsize=1)
def _bpe():
    return _tokenizer_module().SimpleTokenizer()


def vocabulary():
    """CLIP's BPE vocabulary, token -> id (open_clip names the two special tokens <start_of_text>
    and <end_of_text>; OpenAI's and Hugging Face's files name them <|startoftext|>, <|endoftext|>)."""
    return _bpe().encoder


def tokenize(prompts, context_length=77):
    """int64 [B, context_length]: BOS (49406), the BPE tokens truncated to context_length - 2,
    EOS (49407), then EOS repeated to the end, as SD's CLIPTokenizer(padding='max_length') did."""
    bpe = _bpe()
    rows = []
    for text in prompts:
        ids = [bpe.sot_token_id] + bpe.encode(text)[:context_length - 2] + [bpe.eot_token_id]
        rows.append(ids + [bpe.eot_token_id] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)
