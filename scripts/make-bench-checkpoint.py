#!/usr/bin/env python3
"""Writes a random checkpoint shaped like Qwen2.5-0.5B-Instruct, for decode benchmarks.

Qwen2ForCausalLM, 24 layers of width 896, 14 query and 2 key-value heads, intermediate 4864,
vocabulary 151,936, tied embeddings, q/k/v biases, RoPE base 1e6: 494 M parameters, about 1 GB
in bf16, saved by transformers itself (so the layout is what people download). The weights are
random (N(0, 0.02), as transformers initialises them): its text is noise, its speed is real.

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/make-bench-checkpoint.py /tmp/qwen2-0.5b
"""

import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make-bench-checkpoint.py OUTPUT_DIR")
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(sys.argv[1])
    print(f"wrote {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters to {sys.argv[1]}")


if __name__ == "__main__":
    main()
