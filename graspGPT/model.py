"""GraspGPT decoder: a Qwen2-architecture transformer with a fused, chunked, sum-reduced loss.

State-dict keys are exactly those of Hugging Face ``Qwen2ForCausalLM``, so a
checkpoint loads there (with ``to_hf_config()``) without renaming.

Speed on GPUs comes from three places, none of which changes the math: the output layer and
loss are fused (``LinearCrossEntropy``: no full logits, no recompute, aligned matmuls); attention
runs a fused kernel chosen for varying sequence lengths (``ATTENTION_BACKENDS``; optionally
flash-attn-4's, ``ATTENTION``); and
``torch.compile`` turns each transformer block and the softmax of the loss into a few fused
kernels, which also cuts the per-step Python work that otherwise leaves the GPU idle. On the CPU
the very same Python code runs eagerly. ``GRASPGPT_COMPILE=0`` turns compilation off.

Training may pack several samples into one row (``cu_seqlens``, see ``SampleMask``): each sample's
positions restart at 0 and it attends to itself only, so a packed row computes exactly what its
samples would alone, in one fixed-shape pass.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # target id of positions that are not trained on (padding)

# Switches for measuring (bench/), not configuration.
# Compile transformer blocks and the loss's softmax on GPUs.
COMPILE = os.environ.get("GRASPGPT_COMPILE", "1") != "0"
# Attention kernels, in order of preference. cuDNN's kernel is faster per call on Hopper but builds
# a plan for every new sequence length: on the built-in data set, whose lengths vary, that halved
# the tokens/s. Flash needs no per-shape setup. (Left to itself on an H100, torch.compile picked
# cuDNN, so the choice is made explicitly.)
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Attention of packed rows (SampleMask.kind): "auto" takes torch's variable-length flash attention on a
# GPU in bf16/fp16 (no mask to build: the sample boundaries are its input), else flex attention with
# a document mask on a GPU, else SDPA with an explicit block-diagonal mask (the CPU path tests run).
PACKED_ATTENTION = os.environ.get("GRASPGPT_PACKED_ATTENTION", "auto")
PACKED_KINDS = ("varlen", "flex", "sdpa")
# Attention of training and scoring (whole rows and packed rows; not decoding's cached steps): "auto",
# the kernels above, or "fa4", the optional flash-attn-4 package's (Hopper and Blackwell GPUs, bf16/fp16,
# no attention dropout). fa4 wins where the GPU is the bottleneck (1.9x the attention, 1.18x a gpt2 step
# of 4 x 8,192 tokens) and loses where the host is (0.78x at one row of 8,192): docs/BENCHMARKS.md.
ATTENTION = os.environ.get("GRASPGPT_ATTENTION", "auto")
ATTENTION_KINDS = ("auto", "fa4")

# model_type -> (n_layer, n_head, n_embd)
MODEL_PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt-nano": (3, 3, 48),
    "gpt-micro": (4, 4, 128),
    "gpt-mini": (6, 8, 256),
    "gpt-my_mini": (6, 8, 512),
    "gopher-44m": (8, 16, 512),
    "gpt2": (12, 12, 768),
    "openai-gpt": (12, 12, 768),
    "gpt2-small": (16, 16, 1024),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


class ModelConfigError(ValueError):
    """An impossible model shape or setting."""


class ModelInputError(ValueError):
    """Input ids, targets or a KV cache that do not fit the model."""


def default_kv_heads(n_head: int) -> int:
    """The divisor of n_head closest to 4 (ties go to the larger), so every preset builds."""
    divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
    return min(divisors, key=lambda d: (abs(d - 4), -d))


AXIS_INITS = ("sinusoidal", "normal")


@dataclass
class GraspGPTConfig:
    """Everything `GraspGPT` is built from. The training configuration's `model` section
    (`config.ModelConfig`: a preset or a shape) is what a user sets; this is the full architecture
    plus the switches that only matter while training (dropout, init_std, activation_checkpointing,
    loss_chunk_size). `artifact.ModelRecord` saves the architecture part with every checkpoint and export."""

    vocab_size: int
    block_size: int  # max positions
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None  # None -> default_kv_heads(n_head)
    dropout: float = 0.0
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    activation_checkpointing: bool = False
    loss_chunk_size: int = 4096  # rows of logits alive at once in the loss
    # (X, Y, Z) of the voxel grid whose cells are the last X*Y*Z token ids: their embeddings then get
    # learned per-axis terms (TokenEmbedding). None: a plain embedding table.
    voxel_grid: tuple[int, int, int] | None = None
    # How voxel rows start (training only): "sinusoidal", their position alone (own vectors 0, axis terms
    # axis_waves), so that cells start out knowing where they lie; or "normal" noise like every weight.
    axis_init: str = "sinusoidal"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "loss_chunk_size"):
            value = getattr(self, name)
            if name == "n_kv_head" and value is None:
                value = self.n_kv_head = default_kv_heads(self.n_head)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"model.{name} must be a positive integer, got {value!r}; set it to one")
        if self.n_embd % self.n_head:
            raise ModelConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick n_embd a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ModelConfigError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                f"use a divisor of n_head such as {default_kv_heads(self.n_head)}")
        if self.head_dim % 2:
            raise ModelConfigError(
                f"head_dim = n_embd/n_head = {self.head_dim} is odd but RoPE needs it even; "
                f"change n_embd or n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout={self.dropout} must be in [0, 1); use e.g. 0.0 or 0.1")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ModelConfigError(f"model.{name}={getattr(self, name)!r} must be > 0; set a positive value")
        if self.axis_init not in AXIS_INITS:
            raise ModelConfigError(f"axis_init={self.axis_init!r}; use one of {', '.join(AXIS_INITS)}")
        if self.voxel_grid is not None:
            grid = self.voxel_grid = tuple(self.voxel_grid)
            if (len(grid) != 3 or not all(isinstance(d, int) and d > 0 for d in grid)
                    or math.prod(grid) > self.vocab_size):
                raise ModelConfigError(f"voxel_grid={self.voxel_grid} must be 3 positive sizes whose product is "
                                       f"at most vocab_size={self.vocab_size}; pass the data's (X, Y, Z) or None")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_shape(cls, model_type: str | None = None, n_layer: int | None = None, n_head: int | None = None,
                   n_embd: int | None = None, n_kv_head: int | None = None, **rest) -> GraspGPTConfig:
        """Config from a preset name or an explicit (n_layer, n_head, n_embd), never both."""
        shape = (n_layer, n_head, n_embd)
        if not (all(v is None for v in shape) if model_type is not None else all(v is not None for v in shape)):
            raise ModelConfigError(
                f"got model_type={model_type!r}, n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}; "
                f"give either model_type or all of n_layer, n_head, n_embd")
        if model_type is not None:
            if model_type not in MODEL_PRESETS:
                raise ModelConfigError(
                    f"unknown model_type {model_type!r}; use one of {', '.join(MODEL_PRESETS)}")
            n_layer, n_head, n_embd = MODEL_PRESETS[model_type]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=n_kv_head, **rest)


def gpu_compiled(fn, first_tensor: int = 0):
    """fn, compiled into fused kernels when args[first_tensor] is on a GPU; run as written elsewhere.

    Shapes start static; a dimension that changes between calls (sequence length, rows of the last
    loss chunk) becomes dynamic after one recompilation, so varying lengths cost two compilations.
    """
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not (COMPILE and args[first_tensor].is_cuda):
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return run


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalize in fp32, scale in the compute dtype (as Qwen2 does)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., head_dim) cos and sin tables in fp32 for positions (T,) or (B, T), computed on the fly so
    casting the model never degrades them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (rotate_half) rotary embedding of x (..., hd); cos and sin broadcast to x."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer, preallocated to max_len positions, for incremental decoding."""

    def __init__(self, cfg: GraspGPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if not 0 < max_len <= cfg.block_size:
            raise ModelInputError(f"KV cache max_len={max_len} must be in 1..block_size={cfg.block_size}; lower it")
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # Not zeroed: a position is written before it is read (update returns the written positions only),
        # and zeroing the evaluation's caches (tens of GB) costs as long as a decoding step.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, Hkv, T, hd) at start_pos and return all keys/values up to its end."""
        end = start_pos + k.size(2)
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SharedPrefixCache:
    """The cache of decoding `samples` continuations of each of P prompts: each prompt's keys and values once
    (`prefix`, a KVCache of P rows, its first `prefix_len` positions) and each sample's own after them (P *
    samples rows of up to `own_len` positions; the rows of one prompt together). A copy of the prompt per
    sample would cost `samples` times the prompts' cache in memory, and as much memory traffic every step
    (gpt2, 256 samples of a 3,600-token real-grid prompt: 66 GB). `prefix_mask` (P, prefix_len) bool: False
    at a prompt's left padding.

    Held in fp32, as attention reads them, and laid out (P, key heads, samples, ...): a prompt's samples side
    by side under each key head, so that their queries stack against the prompt's keys without a copy."""

    def __init__(self, prefix: KVCache, prefix_len: int, samples: int, own_len: int,
                 prefix_mask: torch.Tensor | None = None):
        L, P, Hkv, _, hd = prefix.k.shape
        self.prefix_k, self.prefix_v = (x[:, :, :, :prefix_len].float() for x in (prefix.k, prefix.v))
        self.k = prefix.k.new_empty((L, P, Hkv, samples, own_len, hd), dtype=torch.float32)  # written before read
        self.v = torch.empty_like(self.k)
        self.padding = None if prefix_mask is None else ~prefix_mask[:, None, None, None, :]
        self.prefixes, self.samples, self.prefix_len = P, samples, prefix_len
        self.batch_size, self.max_len = P * samples, prefix_len + own_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Attention (B, H, T, hd) of queries q at positions start_pos.. (all after the prompt) over the prompt's
        keys and the row's own up to each query; stores k and v (B, Hkv, T, hd) first. One fp32 softmax over
        both parts; the prompt's part is one matmul per prompt and key head, the queries of all its samples
        (and of the query heads sharing that key head) stacked against the keys held once."""
        B, H, T, hd = q.shape
        P, K, Hkv, Tp = self.prefixes, self.samples, k.size(1), self.prefix_len
        rep, at = H // Hkv, start_pos - Tp
        self.k[layer, :, :, :, at: at + T] = k.view(P, K, Hkv, T, hd).transpose(1, 2)
        self.v[layer, :, :, :, at: at + T] = v.view(P, K, Hkv, T, hd).transpose(1, 2)
        q = (q.float() * hd ** -0.5).reshape(P, K, Hkv, rep * T, hd).transpose(1, 2).contiguous()
        own_k, own_v = self.k[layer, :, :, :, :at + T], self.v[layer, :, :, :, :at + T]
        scores = torch.cat([(q.view(P, Hkv, K * rep * T, hd) @ self.prefix_k[layer].mT).view(P, Hkv, K, rep * T, Tp),
                            q @ own_k.mT], dim=-1)  # (P, Hkv, K, rep * T, Tp + at + T)
        if self.padding is not None:
            scores[..., :Tp].masked_fill_(self.padding, float("-inf"))
        if T > 1:  # the own part is causal: query i (position at + i % T) sees own keys up to its position
            q_pos = at + torch.arange(rep * T, device=q.device) % T
            scores[..., Tp:].masked_fill_(torch.arange(at + T, device=q.device) > q_pos[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights[..., :Tp].reshape(P, Hkv, K * rep * T, Tp) @ self.prefix_v[layer]).view(P, Hkv, K, rep * T, hd)
        out = out + weights[..., Tp:] @ own_v
        return out.transpose(1, 2).reshape(B, H, T, hd).to(k.dtype)


Cache = KVCache | SharedPrefixCache


def _varlen_causal():
    """torch's variable-length flash attention, made causal, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "window_size" in inspect.signature(varlen_attn).parameters:  # torch >= 2.11: causal = window (-1, 0)
        return functools.partial(varlen_attn, window_size=(-1, 0))
    return functools.partial(varlen_attn, is_causal=True)


varlen_causal = _varlen_causal()


@functools.cache
def flash_attn_4() -> tuple[Callable, Callable] | Exception:
    """flash-attn-4's (dense, variable-length) attention functions, or why they do not import."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as exc:  # not installed, or installed without the CUDA libraries its kernels need
        return exc
    return flash_attn_func, flash_attn_varlen_func


def fa4_asked(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> bool:
    """Whether GRASPGPT_ATTENTION asks for flash-attn-4; a clear error where it cannot run here."""
    if ATTENTION not in ATTENTION_KINDS:
        raise ModelConfigError(f"GRASPGPT_ATTENTION={ATTENTION!r}; use one of {', '.join(ATTENTION_KINDS)}")
    if ATTENTION == "auto":
        return False
    if isinstance(flash_attn_4(), Exception):
        raise ModelConfigError(f"GRASPGPT_ATTENTION=fa4 needs the flash-attn-4 package ({flash_attn_4()}): pip "
                               f"install flash-attn-4 (see the guide), or unset GRASPGPT_ATTENTION")
    if (device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16)
            or torch.cuda.get_device_capability(device)[0] not in (9, 10)):
        raise ModelConfigError(f"GRASPGPT_ATTENTION=fa4 runs on Hopper or Blackwell GPUs in bf16/fp16 (here: "
                               f"{device.type}, {dtype}); unset GRASPGPT_ATTENTION")
    if dropout:
        raise ModelConfigError(f"GRASPGPT_ATTENTION=fa4 has no attention dropout, but dropout={dropout}; set "
                               f"model.dropout to 0 or unset GRASPGPT_ATTENTION")
    return True


# Its kernels are not torch operators: a compiled block runs them between the graphs before and after.
@torch.compiler.disable
def fa4_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
               max_seqlen: int = 0) -> torch.Tensor:
    """flash-attn-4 causal attention of q (B, T, H, hd) over k, v (B, T, Hkv, hd), grouped-query heads
    read as they are; with cu_seqlens, the batch is one sequence of B*T positions cut there."""
    dense, varlen = flash_attn_4()
    if cu_seqlens is None:
        return dense(q, k, v, causal=True)[0]
    B, T, H, D = q.shape
    y = varlen(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu_seqlens_q=cu_seqlens,
               cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True)[0]
    return y.view(B, T, H, D)


def packed_attention_kind(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel for packed rows on this device and dtype (fa4 if asked, PACKED_ATTENTION, or the auto
    choice)."""
    if fa4_asked(device, dtype):
        return "fa4"
    kind = PACKED_ATTENTION
    if kind == "auto":
        if device.type != "cuda":
            return "sdpa"
        return "varlen" if varlen_causal is not None and dtype in (torch.float16, torch.bfloat16) else "flex"
    if kind not in PACKED_KINDS:
        raise ModelConfigError(f"GRASPGPT_PACKED_ATTENTION={kind!r}; use auto or one of {', '.join(PACKED_KINDS)}")
    if kind == "varlen" and (varlen_causal is None or device.type != "cuda"
                             or dtype not in (torch.float16, torch.bfloat16)):
        raise ModelConfigError(f"GRASPGPT_PACKED_ATTENTION=varlen needs torch.nn.attention.varlen on a GPU in "
                               f"bf16/fp16 (here: {device.type}, {dtype}); use auto")
    return kind


@dataclass
class SampleMask:
    """Attention of packed rows: causal within each sample, nothing across samples (block-diagonal causal).

    Made once per forward by ``sample_mask`` in the form its kernel needs: varlen reads the boundaries
    (``cu_seqlens``) directly, flex a block mask, SDPA a dense (B, 1, T, T) boolean mask.
    """

    kind: str  # one of PACKED_KINDS, or "fa4"
    cu_seqlens: torch.Tensor | None  # (n + 1,) int32: where each sample starts in the flattened (B*T) batch,
    # then B*T; None: one sample a row (fa4 only)
    max_seqlen: int  # bound on a sample's length: the row length
    block_mask: Any = None  # flex's BlockMask
    dense: torch.Tensor | None = None  # SDPA's mask, True where a query may see a key

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, T, H, hd) over k, v (B, T, Hkv, hd); returns (B, T, H, hd)."""
        B, T, H, D = q.shape
        rep = H // k.size(2)
        if self.kind == "fa4":
            return fa4_causal(q, k, v, self.cu_seqlens, self.max_seqlen)
        if self.kind == "varlen":  # the whole batch as one sequence of B*T positions cut at cu_seqlens
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            flat = (B * T, H, D)
            y = varlen_causal(q.reshape(flat), k.reshape(flat), v.reshape(flat), self.cu_seqlens, self.cu_seqlens,
                              self.max_seqlen, self.max_seqlen)
            return y.view(B, T, H, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kind == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            return flex_attention(q, k, v, block_mask=self.block_mask, enable_gqa=rep > 1).transpose(1, 2)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense).transpose(1, 2)


def sample_positions(cu_seqlens: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, samples), each (B, T) long, of packed rows cut at cu_seqlens: a position's index within
    its sample (RoPE restarts at 0 in every sample) and the index of its sample. No host sync."""
    index = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sample = torch.searchsorted(cu_seqlens, index, right=True) - 1
    return (index - cu_seqlens[sample]).view(B, T), sample.view(B, T)


@functools.cache
def block_mask_maker(compiled: bool):
    """flex's create_block_mask; compiled (once, for every mask) on GPUs, where the eager one would
    evaluate the mask at every (query, key) pair in memory."""
    from torch.nn.attention.flex_attention import create_block_mask
    return torch.compile(create_block_mask) if compiled else create_block_mask


def sample_mask(cu_seqlens: torch.Tensor, samples: torch.Tensor, dtype: torch.dtype) -> SampleMask:
    """The SampleMask of packed rows whose positions belong to `samples` (B, T), for a model in `dtype`."""
    B, T = samples.shape
    kind = packed_attention_kind(samples.device, dtype)
    mask = SampleMask(kind, cu_seqlens, T)
    if kind == "flex":
        def same_sample_causal(b, h, q, kv):
            return (samples[b, q] == samples[b, kv]) & (q >= kv)

        mask.block_mask = block_mask_maker(samples.is_cuda)(same_sample_causal, B, None, T, T, device=samples.device)
    elif kind == "sdpa":
        causal = torch.ones(T, T, dtype=torch.bool, device=samples.device).tril()
        mask.dense = ((samples[:, :, None] == samples[:, None, :]) & causal)[:, None]
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: GraspGPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.layer, self.dropout = layer, cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: Cache | None = None, start_pos: int = 0,
                key_mask: torch.Tensor | None = None, samples: SampleMask | None = None):
        B, T, C = x.shape
        # kept in (B, T, heads, hd) memory and seen as (B, heads, T, hd): the layout the fused attention
        # kernels read without a copy
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over the heads
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if samples is not None:
            return self.o_proj(samples.attend(q, k, v).reshape(B, T, C))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if isinstance(cache, SharedPrefixCache):
            return self.o_proj(cache.attend(self.layer, q, k, v, start_pos).transpose(1, 2).reshape(B, T, C))
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start_pos)
        mask, causal = None, True
        if start_pos > 0 or key_mask is not None:  # SDPA's is_causal aligns top-left: build the mask here
            causal = False
            q_pos = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
            k_pos = torch.arange(k.size(2), device=x.device)[None, :]
            if key_mask is not None:  # (B, keys): left padding of a batch of prompts; a query always sees
                # itself, so a padding query has one key and stays finite
                mask = ((k_pos <= q_pos) & key_mask[:, None, :k.size(2)] | (k_pos == q_pos))[:, None]
            elif T > 1:
                mask = k_pos <= q_pos
        rep = self.n_head // self.n_kv_head
        if rep > 1 and T == 1 and cache is not None:
            # A decoding step: the query heads that share a key head become that head's queries, (B, Hkv,
            # rep, hd) against the cache as it is; the mask (B, 1, 1, keys) broadcasts over them. Expanding
            # the cache instead would copy every row's keys and values rep times per layer and step.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, rep, self.head_dim), k, v,
                                               attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
            return self.o_proj(y.reshape(B, T, C))
        # Expanded k/v rather than enable_gqa=True: SDPA's GQA path runs only on the flash and math kernels,
        # so a shape or dtype flash refuses would drop to the O(T^2)-memory math kernel instead of the
        # memory-efficient one; the expanded copy costs only T*n_embd per tensor.
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: GraspGPTConfig):
        super().__init__()
        hidden = 4 * cfg.n_embd
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: GraspGPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache: Cache | None = None, start_pos: int = 0,
                key_mask: torch.Tensor | None = None, samples: SampleMask | None = None):
        # One compiled region per block: its norms, RoPE, SwiGLU and residual adds fuse into a few
        # kernels, and the whole block costs one Python call instead of dozens of kernel launches.
        # Not under ZeRO-3, whose per-module hooks gather the parameters (they carry a ds_id there).
        if cache is None and not hasattr(self.mlp.up_proj.weight, "ds_id"):
            return compiled_block_body(self, x, cos, sin, None, 0, None, samples)
        return self.body(x, cos, sin, cache, start_pos, key_mask, samples)

    def body(self, x, cos, sin, cache: Cache | None = None, start_pos: int = 0,
             key_mask: torch.Tensor | None = None, samples: SampleMask | None = None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, key_mask, samples))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


# One compiled function serves every block of every model: parameters are graph inputs, so all
# instances share the compiled code.
compiled_block_body = gpu_compiled(Block.body, first_tensor=1)


@gpu_compiled
def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of logits[:, :vocab_size] and, with_grad, its gradient w.r.t. logits.

    The columns past vocab_size (alignment padding) take no part: they are masked to -inf, so their
    gradient is zero. The softmax runs in fp32 (or wider) whatever the logits' dtype; the gradient
    comes back in the logits' dtype and shape. Compiled, this reads the logits a few times and writes
    the gradient once, with no (rows, V) fp32 tensor in memory.
    """
    column = torch.arange(logits.size(1), device=logits.device)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)).masked_fill(column >= vocab_size, -torch.inf)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = (lse.squeeze(1) - x.gather(1, targets[:, None]).squeeze(1)).sum()
    if not with_grad:
        return loss, None
    return loss, (torch.exp(x - lse) - (column == targets[:, None]).to(x.dtype)).to(logits.dtype)


def padded_rows(weight: torch.Tensor, multiple: int = 128) -> torch.Tensor:
    """weight with zero rows appended up to a multiple of `multiple` rows.

    GraspGPT's vocabulary size is odd, and a (rows, V) matrix with an odd leading dimension sends
    cuBLAS to its unaligned kernels, about five times slower for the output layer's three matmuls.
    """
    pad = -weight.size(0) % multiple
    return F.pad(weight, (0, 0, 0, pad)) if pad else weight


def output_logits(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """h @ table.T (the tied output layer), through the aligned matmul of the padded table (padded_rows)."""
    return F.linear(h, padded_rows(table))[..., :table.size(0)]


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of CE(h @ weight.T, targets), with the gradients computed chunk by chunk in the forward.

    At most chunk_rows rows of logits exist at a time, and only in the compute dtype. The forward
    already has everything the gradients need, so it computes them there: three matmuls per chunk
    (logits, grad of h, grad of weight) instead of the four of a checkpointed loss, and backward
    only scales the stored grad_h (rows, C) and grad_weight (V, C).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        need_h, need_w = ctx.needs_input_grad[:2]
        vocab_size = weight.size(0)
        wp = padded_rows(weight)
        loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(wp) if need_w else None
        for i in range(0, h.size(0), chunk_rows):
            hc = h[i:i + chunk_rows]
            part, grad = softmax_cross_entropy(hc @ wp.t(), targets[i:i + chunk_rows], vocab_size, True)
            loss += part
            if need_h:
                torch.mm(grad, wp, out=grad_h[i:i + chunk_rows])
            if need_w:
                grad_w.addmm_(grad.t(), hc)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w[:vocab_size])
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss,
                None if grad_w is None else grad_w * grad_loss, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                          num_targets: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of CE over non-ignored targets and their count, never holding more than chunk_rows rows of logits.

    Only rows with a real target are projected (padding costs nothing). Finding them and checking their
    ids each wait for the GPU; a caller that has counted them on the host (the training data pipeline,
    which also checks every id against the vocabulary) passes `num_targets`, and neither waits.
    """
    h = h.reshape(-1, h.size(-1))
    targets = targets.reshape(-1)
    real = targets != IGNORE_INDEX
    keep = (real.nonzero() if num_targets is None else torch.nonzero_static(real, size=num_targets)).squeeze(1)
    h, targets = h.index_select(0, keep), targets.index_select(0, keep)
    n = keep.numel()
    if num_targets is None and n and bool(((targets < 0) | (targets >= weight.size(0))).any()):
        bad = targets[(targets < 0) | (targets >= weight.size(0))][0].item()
        raise ModelInputError(f"target id {bad} is outside 0..{weight.size(0) - 1}; "
                              f"mark non-target positions with IGNORE_INDEX={IGNORE_INDEX}")
    count = torch.tensor(n, dtype=torch.long, device=h.device)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        # even without targets the result stays connected (zero gradients), so every parameter
        # gets a gradient and distributed gradient hooks fire on every rank
        return LinearCrossEntropy.apply(h, weight, targets, chunk_rows), count
    loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    wp = padded_rows(weight)
    for i in range(0, n, chunk_rows):
        loss += softmax_cross_entropy(h[i:i + chunk_rows] @ wp.t(), targets[i:i + chunk_rows], weight.size(0),
                                      False)[0]
    return loss, count


class TokenEmbedding(nn.Module):
    """The token embedding table, shared with the output layer; for voxel tokens optionally factored.

    With ``voxel_grid`` = (X, Y, Z), the row of voxel (x, y, z) is ``weight[id] + x_axis[x] + y_axis[y] +
    z_axis[z]``. Every voxel id is otherwise a separate class among ~147k that would each have to learn
    where it lies from its own few occurrences; the axis terms are shared by all cells of a plane, so
    what is learned about one position carries over to its neighbours, for reading the scene and for
    predicting grasp cells alike. The table is still a plain (V, C) matrix (``table()``): export folds
    the axis terms into ``weight``, giving an ordinary Qwen2 embedding. By default (axis_init "sinusoidal")
    a voxel row starts as its position alone: waves of its coordinates in the axis terms (axis_waves).
    """

    def __init__(self, cfg: GraspGPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_embd))
        self.grid = cfg.voxel_grid
        if self.grid is not None:
            self.x_axis, self.y_axis, self.z_axis = (nn.Parameter(torch.empty(n, cfg.n_embd)) for n in self.grid)

    def table(self) -> torch.Tensor:
        """The (V, C) embedding matrix."""
        if self.grid is None:
            return self.weight
        return embedding_table(self.weight, self.x_axis, self.y_axis, self.z_axis)


def axis_waves(axis: int, size: int, channels: int, std: float) -> torch.Tensor:
    """(size, channels) start of one axis term: in the axis's third of the channels, sine and cosine of the
    coordinate at wavelengths from 2 cells to 4x the axis, RMS `std`; zero elsewhere. Two cells' rows then
    have a dot product that falls with their distance along each axis (a sum of cosines of it), so from
    the first step attention and the output layer can tell near cells from far ones."""
    third = channels // 3
    pairs = third // 2
    out = torch.zeros(size, channels)
    if pairs == 0:
        return out
    wavelengths = 2.0 * (2.0 * max(size, 1)) ** (torch.arange(pairs, dtype=torch.float64) / max(pairs - 1, 1))
    angle = torch.arange(size, dtype=torch.float64)[:, None] * (2 * math.pi / wavelengths)
    lo = axis * third
    out[:, lo: lo + 2 * pairs] = (torch.cat([angle.sin(), angle.cos()], 1) * std * math.sqrt(2.0)).float()
    return out


AXIS_KEYS = tuple(f"model.embed_tokens.{a}_axis" for a in "xyz")  # state-dict keys of the axis terms


def embedding_table(weight: torch.Tensor, x_axis: torch.Tensor, y_axis: torch.Tensor,
                    z_axis: torch.Tensor) -> torch.Tensor:
    """weight with the axis terms added to the voxel rows (the last X*Y*Z ids, x-major: they reshape to
    (X, Y, Z, C), so the sum is a broadcast)."""
    cells = x_axis[:, None, None] + y_axis[None, :, None] + z_axis[None, None, :]
    cells = cells.reshape(-1, weight.size(1))
    first = weight.size(0) - cells.size(0)
    return torch.cat([weight[:first], weight[first:] + cells])


def fold_axes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with the axis terms folded into model.embed_tokens.weight: a plain Qwen2 embedding."""
    if AXIS_KEYS[0] not in state_dict:
        return state_dict
    out = {k: v for k, v in state_dict.items() if k not in AXIS_KEYS}
    table = embedding_table(state_dict["model.embed_tokens.weight"], *(state_dict[k] for k in AXIS_KEYS))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # the tied copy too, where the dict holds one
        if key in out:
            out[key] = table
    return out


class GraspGPT(nn.Module):
    def __init__(self, cfg: GraspGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=TokenEmbedding(cfg),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            norm=RMSNorm(cfg.n_embd, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied: one Parameter
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, TokenEmbedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            grid = self.cfg.voxel_grid
            if self.cfg.axis_init == "sinusoidal" and grid and module.weight is self.lm_head.weight:
                with torch.no_grad():  # the tied table is visited twice (embedding, head): zeroed both times
                    module.weight[module.weight.size(0) - math.prod(grid):].zero_()
        if isinstance(module, TokenEmbedding) and module.grid is not None:
            for a, axis in enumerate((module.x_axis, module.y_axis, module.z_axis)):
                if self.cfg.axis_init == "sinusoidal":
                    with torch.no_grad():
                        axis.copy_(axis_waves(a, axis.size(0), axis.size(1), self.cfg.init_std))
                else:
                    nn.init.normal_(axis, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def _hidden(self, input_ids: torch.Tensor, table: torch.Tensor, cache: Cache | None = None,
                start_pos: int = 0, key_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ModelInputError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}; "
                                  f"add a batch dimension")
        B, T = input_ids.shape
        samples = None
        if cu_seqlens is not None:  # packed rows; the collate keeps each sample within block_size
            self._check_packed(input_ids, cache, start_pos, key_mask, cu_seqlens)
            positions, in_sample = sample_positions(cu_seqlens, B, T)
            samples = sample_mask(cu_seqlens, in_sample, table.dtype)
        else:
            if start_pos + T > self.cfg.block_size:
                raise ModelInputError(f"positions {start_pos}..{start_pos + T - 1} exceed block_size="
                                      f"{self.cfg.block_size}; shorten the sequence or raise block_size")
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
            if (cache is None and key_mask is None and start_pos == 0 and T > 1
                    and fa4_asked(table.device, table.dtype, self.cfg.dropout if self.training else 0.0)):
                samples = SampleMask("fa4", None, T)  # one sample a row
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.drop(F.embedding(input_ids, table))
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):  # also when a compiled block is traced
            for block in self.model.layers:
                if recompute:
                    x = checkpoint(block, x, cos, sin, None, 0, None, samples, use_reentrant=False)
                else:
                    x = block(x, cos, sin, cache, start_pos, key_mask, samples)
        return self.model.norm(x)

    def _check_packed(self, input_ids, cache, start_pos, key_mask, cu_seqlens) -> None:
        if cache is not None or start_pos or key_mask is not None:
            raise ModelInputError("cu_seqlens (packed rows) is for training and scoring; decode with a KV cache "
                                  "without it")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.device != input_ids.device:
            raise ModelInputError(f"cu_seqlens must be a 1-D int32 tensor on {input_ids.device}, got "
                                  f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype} on {cu_seqlens.device}")
        if self.training and self.cfg.dropout > 0:
            raise ModelInputError(f"packed rows have no attention dropout, but dropout={self.cfg.dropout}; "
                                  f"set dropout 0 or train on unpacked batches")

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                start_pos: int = 0, last_only: bool = False, key_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, num_targets: int | None = None):
        """Logits (B, T, V) in the compute dtype, or with targets (loss_sum fp32, num_targets long).

        The loss is a sum, not a mean: the trainer divides by the target count of the whole global batch.
        With a `cache` (decoding, see forward_cached) the positions start at start_pos; last_only keeps
        the last position's logits only; key_mask (B, cache positions) bool marks the keys each row may
        attend to (False: left padding of a batch of prompts of different lengths). Decoding runs through
        here too, so that under ZeRO-3 the parameters are gathered the same way as in training.
        cu_seqlens (n + 1,) int32 packs several samples into each row: sample i is positions cu_seqlens[i]
        to cu_seqlens[i + 1] of the flattened (B*T) batch (the first 0, the last B*T, no sample across two
        rows); its positions restart at 0 and it attends to itself only (SampleMask). num_targets: how many
        targets are not IGNORE_INDEX, counted by the caller, whose ids it vouches for (chunked_cross_entropy).
        """
        if cache is not None:
            B, T = input_ids.shape
            if B != cache.batch_size or start_pos + T > cache.max_len:
                raise ModelInputError(f"batch {B}, positions up to {start_pos + T} do not fit a cache of batch "
                                      f"{cache.batch_size}, max_len {cache.max_len}; make a larger cache")
            if isinstance(cache, SharedPrefixCache) and (start_pos < cache.prefix_len or key_mask is not None):
                raise ModelInputError(f"a SharedPrefixCache takes the positions after its prompts "
                                      f"({cache.prefix_len}..) and their padding from its prefix_mask, got "
                                      f"start_pos {start_pos}"
                                      f"{' and a key_mask' if key_mask is not None else ''}; feed the prompts "
                                      f"through a KVCache first")
        table = self.output_weight()  # built once per call: the input lookup and the tied output layer share it
        h = self._hidden(input_ids, table, cache, start_pos, key_mask, cu_seqlens)
        if targets is None:
            return output_logits(h[:, -1:] if last_only else h, table)
        if targets.shape != input_ids.shape:
            raise ModelInputError(f"targets shape {tuple(targets.shape)} != input_ids shape "
                                  f"{tuple(input_ids.shape)}; pass one target per input position")
        return chunked_cross_entropy(h, table, targets, self.cfg.loss_chunk_size, num_targets)

    @torch.no_grad()
    def logits_at(self, input_ids: torch.Tensor, positions: torch.Tensor, chunk: int = 512) -> Iterator[torch.Tensor]:
        """Logits of one sequence (1, T) at `positions` (K,) only, yielded as fp32 chunks of up to `chunk`
        rows, so that a long sequence never holds (T, V) or (K, V) logits. For evaluation (not ZeRO-3)."""
        table = self.output_weight()
        h = self._hidden(input_ids, table)[0, positions]
        for lo in range(0, len(positions), chunk):
            yield output_logits(h[lo: lo + chunk], table).float()

    def output_weight(self) -> torch.Tensor:
        """The (V, C) embedding table, axis terms included: the input embedding and (tied) the output layer."""
        return self.model.embed_tokens.table()

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache on the model's device and dtype (max_len defaults to block_size)."""
        w = self.lm_head.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.block_size, device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache: Cache, start_pos: int,
                       last_only: bool = False, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for positions start_pos.. of input_ids (B, T), reusing and extending the cache.

        Feed the prompt with start_pos=0, then each new token with start_pos = tokens seen so far.
        last_only returns (B, 1, V) so a long prompt never materializes its full logits. Prompts of
        different lengths go in left-padded, with key_mask (B, cache.max_len) False at the padding:
        RoPE depends only on distances, so each row computes what it would alone.
        """
        return self(input_ids, cache=cache, start_pos=start_pos, last_only=last_only, key_mask=key_mask)

    def num_params(self) -> int:
        """Parameter count, the tied embedding counted once (full sizes also when ZeRO-3 partitions them)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls plus 12*L*C*T for attention."""
        return 6 * self.num_params() + 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len

    def configure_param_groups(self, weight_decay: float) -> list[dict]:
        """Decay only the 2-D projection weights of attention/MLP; never norms, biases or the embedding."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # yields the tied embedding once
            if not p.requires_grad:
                continue
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves p itself empty
            (decay if ndim == 2 and name.startswith("model.layers.") else no_decay).append(p)
        return [dict(name="decay", params=decay, weight_decay=weight_decay),
                dict(name="no_decay", params=no_decay, weight_decay=0.0)]

    def to_hf_config(self, dtype: str = "bfloat16") -> dict:
        """config.json contents for transformers' Qwen2ForCausalLM (loads in 4.x and 5.x)."""
        c = self.cfg
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd,
            "intermediate_size": 4 * c.n_embd,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "max_position_embeddings": c.block_size,
            "rope_theta": c.rope_theta,  # read by transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # read by 5.x
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": True,
            "hidden_act": "silu",
            "attention_dropout": c.dropout,
            "use_sliding_window": False,
            "initializer_range": c.init_std,
            "torch_dtype": dtype,  # 4.x name
            "dtype": dtype,  # 5.x name
        }
