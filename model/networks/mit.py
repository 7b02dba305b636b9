"""SegFormer Mix Transformer (MiT) encoder in plain PyTorch, stage strides 4, 2, 2, 1.

Follows the published SegFormer code (NVlabs/SegFormer, ``mix_transformer.py``): overlapping
patch embeddings, efficient self-attention with spatial reduction, Mix-FFN with a depthwise 3x3
conv. As in TPRO/PBIP the last stage keeps stride 1, so a 224 px tile gives maps at 56/28/14/14.
Random init by default; ``model.networks.pretrained.load_encoder_weights`` loads published ImageNet weights
(NVlabs or Hugging Face layout, renamed by :func:`rename_published`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MiTConfig:
    """Widths, depths and heads of the four stages (B0..B3 as published, or custom)."""

    embed_dims: tuple[int, int, int, int] = (32, 64, 160, 256)
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    strides: tuple[int, int, int, int] = (4, 2, 2, 1)
    drop_path_rate: float = 0.1


MIT_VARIANTS: dict[str, MiTConfig] = {
    "b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8)),
    "b1": MiTConfig((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8)),
    "b2": MiTConfig((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8)),
    "b3": MiTConfig((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8)),
}


def mit_config(variant: str = "b0", **overrides: Any) -> MiTConfig:
    """A published variant with optional overrides (e.g. ``depths=[1,1,1,1]`` for a CPU budget)."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"unknown MiT variant {variant!r}; choose one of {', '.join(MIT_VARIANTS)}")
    base = MIT_VARIANTS[variant].__dict__.copy()
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in base:
            raise ValueError(f"unknown MiT option {key!r}")
        base[key] = tuple(value) if isinstance(value, list | tuple) else value
    return MiTConfig(**base)


class DropPath(nn.Module):
    """Stochastic depth per sample (as in timm; re-implemented, no timm dependency)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class OverlapPatchEmbed(nn.Module):
    """Strided conv (7x7 for stride 4, 3x3 otherwise) + LayerNorm: overlapping patches."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        kernel = 7 if stride == 4 else 3
        self.proj = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values are spatially reduced by ``sr_ratio``."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x_ = x.transpose(1, 2).reshape(b, c, h, w)
            if h < self.sr_ratio or w < self.sr_ratio:  # tiny inputs: replicate up to one window
                x_ = F.pad(x_, (0, max(0, self.sr_ratio - w), 0, max(0, self.sr_ratio - h)), mode="replicate")
            x_ = self.sr(x_)
            x_ = self.norm(x_.flatten(2).transpose(1, 2))
        else:
            x_ = x
        kv = self.kv(x_).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv (positional information without embeddings) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, _, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """Four stages; ``forward`` returns the four NCHW feature maps (strides 4, 8, 16, 16)."""

    def __init__(self, cfg: MiTConfig, in_ch: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        self.patch_embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_prev, k = in_ch, 0
        for i in range(4):
            self.patch_embeds.append(OverlapPatchEmbed(c_prev, cfg.embed_dims[i], cfg.strides[i]))
            self.stages.append(
                nn.ModuleList(
                    Block(
                        cfg.embed_dims[i], cfg.num_heads[i], cfg.mlp_ratios[i], cfg.sr_ratios[i], rates[k + j]
                    )
                    for j in range(cfg.depths[i])
                )
            )
            self.norms.append(nn.LayerNorm(cfg.embed_dims[i]))
            k += cfg.depths[i]
            c_prev = cfg.embed_dims[i]
        self.apply(_init_weights)

    @property
    def out_channels(self) -> tuple[int, int, int, int]:
        return self.cfg.embed_dims

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        for embed, blocks, norm in zip(self.patch_embeds, self.stages, self.norms, strict=True):
            tokens, h, w = embed(x)
            for blk in blocks:
                tokens = blk(tokens, h, w)
            x = norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            feats.append(x)
        return feats


def _init_weights(m: nn.Module) -> None:
    """SegFormer's init: truncated normal linears, fan-out normal convs, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_HF_PARTS = (
    ("attention.self.query.", "attn.q."),
    ("attention.self.sr.", "attn.sr."),
    ("attention.self.layer_norm.", "attn.norm."),
    ("attention.output.dense.", "attn.proj."),
    ("layer_norm_1.", "norm1."),
    ("layer_norm_2.", "norm2."),
    ("mlp.dense1.", "mlp.fc1."),
    ("mlp.dense2.", "mlp.fc2."),
)


def rename_published(key: str) -> str:
    """One key of a published MiT state dict -> this module's name.

    Two layouts exist: NVlabs' ``mit_b*.pth`` (``patch_embed1.``, ``block1.0.``, ``norm1.``,
    ``mlp.dwconv.dwconv.``) and the Hugging Face ``nvidia/mit-b*`` one (``segformer.encoder.
    patch_embeddings.0.``, ``block.0.0.attention.self.query.`` ...). Keys and values that the HF
    layout keeps apart are fused by :func:`fuse_hf_kv`.
    """
    for prefix in ("module.", "segformer.encoder.", "encoder.", "backbone."):
        key = key.removeprefix(prefix)
    key = key.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
    for i in range(1, 5):
        pairs = ((f"patch_embed{i}.", "patch_embeds"), (f"block{i}.", "stages"), (f"norm{i}.", "norms"))
        for old, new in pairs:
            if key.startswith(old):
                return f"{new}.{i - 1}." + key[len(old) :]
    if key.startswith(("patch_embeddings.", "block.", "layer_norm.")):
        head, rest = key.split(".", 1)
        names = {"patch_embeddings": "patch_embeds", "block": "stages", "layer_norm": "norms"}
        key = names[head] + "." + rest
        if key.startswith("patch_embeds."):
            key = key.replace(".layer_norm.", ".norm.")
        for old, new in _HF_PARTS:
            key = key.replace(old, new)
    return key


def fuse_hf_kv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keeps ``attention.self.key`` and ``.value`` apart; this module has one ``attn.kv``."""
    out = dict(state)
    for k in [k for k in state if ".attention.self.key." in k]:
        v = k.replace(".key.", ".value.")
        if v in state:
            fused = k.replace("attention.self.key.", "attention.self.kv.")
            out[fused] = torch.cat([state[k], state[v]], dim=0)
            del out[k], out[v]
    return {k.replace("attention.self.kv.", "attn.kv."): v for k, v in out.items()}
