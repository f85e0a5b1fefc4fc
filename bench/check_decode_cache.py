"""The shared prompt cache against one cache row per sequence, on this machine's device and dtype.

    python bench/check_decode_cache.py --model gpt2 --prompt 3600 --samples 4 --steps 4

Untrained model (weights seeded), two left-padded prompts of random tokens (the longer `--prompt` long),
`--samples` continuations each, fed token by token: the logits through model.SharedPrefixCache against
the same sequences decoded each with its own KVCache (the prompt copied per row). Prints one JSON line:
the largest logit difference, its scale (the largest logit), and how often the two agree on the argmax.
"""
from __future__ import annotations

import argparse
import json

import torch

from graspGPT.model import GraspGPT, GraspGPTConfig, SharedPrefixCache


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--vocab", type=int, default=147_219)
    ap.add_argument("--prompt", type=int, default=3600)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on a GPU, else fp32")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device == "cuda" else "fp32")) == "bf16" else torch.float32
    torch.manual_seed(0)
    T, K, S = args.prompt, args.samples, args.steps
    cfg = GraspGPTConfig.from_shape(model_type=args.model, vocab_size=args.vocab, block_size=T + S + 1)
    model = GraspGPT(cfg).to(device, dtype).eval()
    lengths = (T, T - 37)
    ids = torch.randint(0, args.vocab, (2, T), device=device)
    key_mask = torch.ones(2, T, dtype=torch.bool, device=device)
    key_mask[1, :T - lengths[1]] = False
    follow = torch.randint(0, args.vocab, (2 * K, S), device=device)

    prefix = model.new_kv_cache(2, T)
    model.forward_cached(ids, prefix, 0, last_only=True, key_mask=key_mask)
    shared = SharedPrefixCache(prefix, T, K, S, key_mask)
    got = torch.cat([model.forward_cached(follow[:, s:s + 1], shared, T + s) for s in range(S)], 1).float()

    rows = model.new_kv_cache(2 * K, T + S)  # each sequence its own copy of its prompt
    wide_mask = torch.cat([key_mask, key_mask.new_ones(2, S)], 1).repeat_interleave(K, 0)
    model.forward_cached(ids.repeat_interleave(K, 0), rows, 0, last_only=True, key_mask=wide_mask)
    want = torch.cat([model.forward_cached(follow[:, s:s + 1], rows, T + s, key_mask=wide_mask)
                      for s in range(S)], 1).float()
    print(json.dumps({"check": "shared prompt cache", "model": args.model, "device": device, "dtype": str(dtype), "prompt": T, "samples": K,
                      "steps": S, "max_abs_diff": float(f"{(got - want).abs().max().item():.3g}"),
                      "max_abs_logit": round(want.abs().max().item(), 3),
                      "argmax_agree": round((got.argmax(-1) == want.argmax(-1)).float().mean().item(), 4)}))


if __name__ == "__main__":
    main()
