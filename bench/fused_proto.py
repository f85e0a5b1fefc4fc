"""What fusing q/k/v and gate/up into one linear each would buy the training step (a measuring prototype, not
the product): gpt2 has 86 parameter tensors instead of 146, and DeepSpeed's step works tensor by tensor.

    python3 bench/fused_proto.py --micro-batch 1 --case fast/gpt2/8192/1/1      # bench_train.py's arguments

Training cases of whole or packed rows only (no decoding caches, no flash-attn-4 for whole rows); the rows it
prints are labelled fast+fused_proto. The product keeps Qwen2's separate tensors (docs/BENCHMARKS.md says why).
"""
import sys

import torch
import torch.nn as nn

import graspGPT.model as gm


class FusedAttention(gm.Attention):
    def __init__(self, cfg, layer):
        nn.Module.__init__(self)
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.layer, self.dropout = layer, cfg.dropout
        self.qkv_proj = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0, key_mask=None, samples=None):
        if cache is not None or start_pos or key_mask is not None:
            raise NotImplementedError("fused_proto measures training steps only; decoding needs the model's Attention")
        B, T, C = x.shape
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k, v = self.qkv_proj(x).view(B, T, -1, self.head_dim).split(
            [self.n_head, self.n_kv_head, self.n_kv_head], 2)
        q, k = gm.apply_rope(q, cos, sin), gm.apply_rope(k, cos, sin)
        if samples is not None:
            return self.o_proj(samples.attend(q, k, v).reshape(B, T, C))
        rep = self.n_head // self.n_kv_head
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class FusedMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = 4 * cfg.n_embd
        self.gate_up_proj = nn.Linear(cfg.n_embd, 2 * h, bias=False)
        self.down_proj = nn.Linear(h, cfg.n_embd, bias=False)
        self.up_proj = self.gate_up_proj  # Block.forward looks for up_proj.weight

    def forward(self, x):
        g, u = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(gm.swiglu(g, u))


gm.Attention, gm.MLP = FusedAttention, FusedMLP

if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import bench_train
    run_case = bench_train.run_case

    def labelled(impl, *args):
        return {**run_case(impl, *args), "impl": impl + "+fused_proto"}
    bench_train.run_case = labelled
    bench_train.main()
