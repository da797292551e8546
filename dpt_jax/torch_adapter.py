"""PyTorch twin of :class:`dpt_jax.models.adapter.DiscriminativeAdapter`.

Loads ``dpt_adapter.safetensors`` + ``dpt_adapter.json`` written by the JAX side so PyTorch users
can run self-correction with diffusers (whose U-Net gives NCHW feature maps: this module takes
NCHW). Module names mirror the Flax parameter paths (DETR / MDETR naming); in eval mode the
outputs match the Flax adapter in float32. As on the Flax side there is no attention-weight
dropout, only dropout on the residual branches and inside the FFN.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Features = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def itm_score(itm_embeds: torch.Tensor, pooled_text: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Max over queries of cosine(query, pooled text): [B,Q,D], [B,D] -> [B] float32."""
    q = F.normalize(itm_embeds.float(), dim=-1, eps=eps)
    t = F.normalize(pooled_text.float(), dim=-1, eps=eps)
    return torch.einsum("bqd,bd->bq", q, t).amax(dim=1)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` with flip_sin_to_cos=True, downscale_freq_shift=0;
    the frequency table is rounded once from float64, as on the JAX side."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half
    freqs = torch.exp(exponent).to(device=timesteps.device, dtype=torch.float32)
    args = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sine_position_embedding(height: int, width: int, num_pos_feats: int, device: Optional[torch.device] = None,
                            temperature: float = 10000.0, eps: float = 1e-6) -> torch.Tensor:
    """DETR's ``PositionEmbeddingSine`` (normalize=True, scale 2*pi) -> [height*width, 2*num_pos_feats]."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def axis(n: int) -> torch.Tensor:
        coord = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + eps) * scale
        arg = coord[:, None] / dim_t
        return torch.stack([arg[:, 0::2].sin(), arg[:, 1::2].cos()], dim=-1).flatten(1)

    pos_y = axis(height)[:, None, :].expand(height, width, num_pos_feats)
    pos_x = axis(width)[None, :, :].expand(height, width, num_pos_feats)
    return torch.cat([pos_y, pos_x], dim=-1).reshape(height * width, 2 * num_pos_feats)


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Matches ``jax.image.resize(..., "bilinear")`` (antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TimestepMLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_model, 4 * d_model)
        self.linear_2 = nn.Linear(4 * d_model, d_model)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_embedding(timesteps, self.linear_1.in_features))))


class _Layer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, norms: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        for i in range(1, norms + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model))

    @staticmethod
    def _attn(d_model: int, num_heads: int) -> nn.MultiheadAttention:
        return nn.MultiheadAttention(d_model, num_heads, dropout=0.0, batch_first=True)

    def _add_norm(self, x: torch.Tensor, branch: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return norm(x + self.dropout(branch))

    def _ffn(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return self._add_norm(x, self.linear2(self.dropout(F.relu(self.linear1(x)))), norm)


class EncoderLayer(_Layer):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__(d_model, num_heads, ffn_dim, dropout, norms=2)
        self.self_attn = self._attn(d_model, num_heads)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = src + pos
        src = self._add_norm(src, self.self_attn(qk, qk, src, need_weights=False)[0], self.norm1)
        return self._ffn(src, self.norm2)


class DecoderLayer(_Layer):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__(d_model, num_heads, ffn_dim, dropout, norms=3)
        self.self_attn = self._attn(d_model, num_heads)
        self.multihead_attn = self._attn(d_model, num_heads)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        qk = tgt + query_pos
        tgt = self._add_norm(tgt, self.self_attn(qk, qk, tgt, need_weights=False)[0], self.norm1)
        cross = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self._add_norm(tgt, cross, self.norm2)
        return self._ffn(tgt, self.norm3)


class Encoder(nn.Module):
    def __init__(self, num_layers: int, *args):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(*args) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src


class Decoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, *args):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, *args) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class Transformer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float,
                 num_encoder_layers: int, num_decoder_layers: int):
        super().__init__()
        self.encoder = Encoder(num_encoder_layers, d_model, num_heads, ffn_dim, dropout)
        self.decoder = Decoder(num_decoder_layers, d_model, num_heads, ffn_dim, dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(src, pos)
        return self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos)


class TorchDiscriminativeAdapter(nn.Module):
    """The adapter in PyTorch. ``in_channels``: the tap's channels for fusion "single", the
    summed channels of all taps for "concat", one entry per tap (in ``taps`` order) for "sum".
    ``forward(features NCHW or dict of NCHW, timesteps [B], text_tokens=None)`` returns the same
    dict as the Flax module."""

    def __init__(self, in_channels: Union[int, Sequence[int]], clip_dim: int, text_width: int,
                 d_model: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 num_encoder_layers: int = 1, num_decoder_layers: int = 1, num_itm_queries: int = 10,
                 num_rec_queries: int = 100, max_text_len: int = 77, align_dim: int = 64,
                 fusion: str = "single", fusion_size: int = 32, taps: Sequence[str] = ()):
        super().__init__()
        self.fusion, self.fusion_size, self.taps = fusion, fusion_size, tuple(taps)
        self.num_itm_queries = num_itm_queries
        if fusion == "sum":
            self.fusion_proj = nn.ModuleList(nn.Conv2d(c, d_model, 1) for c in in_channels)
        else:
            self.input_proj = nn.Conv2d(int(in_channels), d_model, 1)
        self.time_embedding = TimestepMLP(d_model)
        self.query_embed = nn.Embedding(num_itm_queries + num_rec_queries, d_model)
        self.transformer = Transformer(d_model, num_heads, ffn_dim, dropout, num_encoder_layers,
                                       num_decoder_layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm_head = MLP(d_model, d_model, clip_dim, 2)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.class_embed = nn.Linear(d_model, max_text_len + 1)
        self.contrastive_align_projection_image = nn.Linear(d_model, align_dim)
        self.contrastive_align_projection_text = nn.Linear(text_width, align_dim)

    def _tap_order(self, features: Mapping[str, torch.Tensor]) -> List[str]:
        if not self.taps:
            return sorted(features)
        if set(self.taps) != set(features):
            raise ValueError(f"adapter expects taps {list(self.taps)}, got {sorted(features)}")
        return list(self.taps)

    def _project_features(self, features: Features) -> torch.Tensor:
        if self.fusion == "single":
            return self.input_proj(features)
        maps = [features[n] for n in self._tap_order(features)]
        if self.fusion == "concat":
            h, w = maps[0].shape[-2:]
            return self.input_proj(torch.cat([_resize(m, h, w) for m in maps], dim=1))
        s = self.fusion_size
        return sum(conv(_resize(m, s, s)) for conv, m in zip(self.fusion_proj, maps))

    def project_text_tokens(self, text_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.contrastive_align_projection_text(text_tokens).float(), dim=-1)

    def forward(self, features: Features, timesteps: torch.Tensor,
                text_tokens: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        x = self._project_features(features)
        b, d, h, w = x.shape
        src = x.flatten(2).transpose(1, 2)
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(b)
        pos = sine_position_embedding(h, w, d // 2, x.device).to(x.dtype)[None] + \
            self.time_embedding(timesteps).to(x.dtype)[:, None]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1).to(x.dtype)
        hs = self.transformer(src, pos, query_pos)
        itm_hs, rec_hs = hs[:, :self.num_itm_queries], hs[:, self.num_itm_queries:]
        out = {
            "itm_embeds": self.itm_head(itm_hs),
            "pred_boxes": self.bbox_embed(rec_hs).sigmoid(),
            "pred_logits": self.class_embed(rec_hs),
            "proj_queries": F.normalize(self.contrastive_align_projection_image(rec_hs).float(), dim=-1),
        }
        if text_tokens is not None:
            out["proj_tokens"] = self.project_text_tokens(text_tokens)
        return out


def _in_channels(state: Mapping[str, torch.Tensor], fusion: str) -> Union[int, List[int]]:
    """The tap channels, read off the input projection weights (the JSON does not carry them)."""
    if fusion == "sum":
        n = len({k.split(".")[1] for k in state if k.startswith("fusion_proj.")})
        return [int(state[f"fusion_proj.{i}.weight"].shape[1]) for i in range(n)]
    return int(state["input_proj.weight"].shape[1])


def load_dpt_adapter(safetensors_path: str, config_json_path: str) -> TorchDiscriminativeAdapter:
    """Build the adapter from ``dpt_adapter.json`` and load ``dpt_adapter.safetensors`` strictly;
    returned in eval mode, float32, on the CPU. Needs torch and safetensors only (no JAX)."""
    from safetensors.torch import load_file
    with open(config_json_path) as f:
        config = json.load(f)
    state = load_file(safetensors_path)
    model = TorchDiscriminativeAdapter(_in_channels(state, config.get("fusion", "single")), **config)
    model.load_state_dict(state, strict=True)
    return model.eval()
