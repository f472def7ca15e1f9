"""The VITA-1.5 vision encoder: InternViT-300M tower, pixel shuffle and the mlp2x_gelu projector.

Implements `tests/golden/vita15_architecture.md` §2. Key names:
- `InternVisionModel.state_dict()` = checkpoint keys after stripping `model.vision_tower.vision_tower.`;
- `VisionEncoder.state_dict()` = `vision_tower.*` (the tower) and `mm_projector.{0,2}.*` (checkpoint
  prefix `model.` stripped from `model.mm_projector.*`).

`VisionEncoder(pixel_values (N, 3, 448, 448)) -> (N, 256, llm_hidden_size)`: 256 LLM embedding rows per
tile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import VisionConfig

# §2.3: features are scaled by 0.5 before the pixel shuffle (`scale_pix_shuffle`).
PIXEL_SHUFFLE_SCALE = 0.5


class InternVisionEmbeddings(nn.Module):
    """§2.1: Conv2d patch embedding with bias, a CLS token, learned positions (bicubic-resized to the
    actual patch grid when it differs from the training grid)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, c))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Parameter(torch.randn(1, 1 + self.grid * self.grid, c))

    def _patch_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings of the patches for a grid_h × grid_w grid: (1, grid_h*grid_w, C)."""
        pos = self.position_embedding[:, 1:]
        if (grid_h, grid_w) == (self.grid, self.grid):
            # Bicubic resampling to the same size is an exact identity (§2.1).
            return pos
        c = pos.shape[-1]
        table = pos.float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return table.reshape(1, c, grid_h * grid_w).transpose(1, 2).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (N, C, grid_h, grid_w)
        n, _, grid_h, grid_w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # row-major patch index 32*row + col
        cls = self.class_embedding.expand(n, -1, -1).to(patches.dtype)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(grid_h, grid_w)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(patches.dtype)


class InternAttention(nn.Module):
    """§2.2 step 2: fused qkv (channel layout (3, heads, head_dim)), unmasked softmax attention, proj."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} not divisible by {cfg.num_attention_heads} heads"
            )
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, head_dim)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(o.transpose(1, 2).reshape(n, t, c))


class InternMLP(nn.Module):
    """§2.2 step 5: fc1 → exact GELU → fc2."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """§2.2: pre-norm block with per-channel layer scales ls1 / ls2."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.attn = InternAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(c))
        self.norm2 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.mlp = InternMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.ls1 * self.attn(self.norm1(h))
        return h + self.ls2 * self.mlp(self.norm2(h))


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


class InternVisionModel(nn.Module):
    """InternViT-300M: embeddings + encoder layers, no final norm. Output = last hidden state
    (N, 1 + n_patches, C), CLS first."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_pixel_values(pixel_values, self.cfg)
        return self.encoder(self.embeddings(pixel_values))


def _check_pixel_values(pixel_values: torch.Tensor, cfg: VisionConfig) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise InvalidInput(f"pixel_values must be a 4-D tensor (N, C, H, W), got {shape}")
    n, c, h, w = pixel_values.shape
    if n < 1 or c != cfg.num_channels or h < cfg.patch_size or w < cfg.patch_size:
        raise InvalidInput(
            f"pixel_values shape {tuple(pixel_values.shape)} is invalid: "
            f"need N >= 1, C = {cfg.num_channels}, H and W >= {cfg.patch_size}"
        )
    if not pixel_values.is_floating_point():
        raise InvalidInput(f"pixel_values must be floating point, got {pixel_values.dtype}")


def pixel_shuffle_features(h: torch.Tensor) -> torch.Tensor:
    """§2.3: drop CLS, ×0.5, 2×2 pixel shuffle. (N, 1 + S², C) -> (N, (S/2)², 4C).

    out[n, (S/2)*i + j, C*(2*dr + dc) + c] = 0.5 * g[n, 2i + dr, 2j + dc, c]: each token is one 2×2 block
    of patches (top-left, top-right, bottom-left, bottom-right), tokens row-major over the blocks.
    """
    n, t, c = h.shape
    side = math.isqrt(t - 1)
    if side * side != t - 1 or side % 2:
        raise InvalidInput(f"pixel shuffle needs an even square patch grid, got {t - 1} patch tokens")
    half = side // 2
    g = (h[:, 1:] * PIXEL_SHUFFLE_SCALE).reshape(n, half, 2, half, 2, c)  # [n, i, dr, j, dc, c]
    return g.permute(0, 1, 3, 2, 4, 5).reshape(n, half * half, 4 * c)


class VisionEncoder(nn.Module):
    """Tower → pixel shuffle → mlp2x_gelu projector (§2.4): (N, 3, 448, 448) -> (N, 256, llm_hidden)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = InternVisionModel(cfg)
        self.mm_projector = nn.Sequential(
            nn.Linear(cfg.mm_hidden_size, cfg.llm_hidden_size),
            nn.GELU(),
            nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_pixel_values(pixel_values, self.cfg)
        weight = self.vision_tower.embeddings.patch_embedding.weight
        hidden = self.vision_tower(pixel_values.to(device=weight.device, dtype=weight.dtype))
        return self.mm_projector(pixel_shuffle_features(hidden))
