"""Build the tiny random Llama that scripts/vllm-check.sh serves (no download).

    python scripts/vllm/make_model.py OUT_DIR

Llama architecture, 4 layers, hidden 256, 4 attention heads over 2 KV heads
(grouped-query attention, as real Llamas), 2048-token vocabulary, float32.
Weights are random with the scales a trained model has (linear layers with
standard deviation 0.02, embeddings 1.0, RMSNorm gains 1): attention is then
sharp enough that KV blocks read in the wrong place change the tokens. A fixed
seed makes the model the same on every run; no tokenizer is written (prompts
are token ids and vLLM runs with --skip-tokenizer-init).
"""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    print(out)


if __name__ == "__main__":
    main()
