"""Tiny random models for tests: real Hugging Face architectures built from configs, with a
byte-level tokenizer (label words become several tokens, which exercises multi-token scoring)."""

from __future__ import annotations

import torch

from icl_scale.modeling.capture import implementation
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, XGLMConfig)

SPECIALS = ("<bos>", "<eos>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def tiny_config(name: str, vocab_size: int):
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=2048, n_embd=64, n_layer=3, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256, eos_token_id=257)
    if name == "tiny-llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    if name == "tiny-opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
                         ffn_dim=128, num_attention_heads=4, max_position_embeddings=2048, dropout=0.0,
                         attention_dropout=0.0, bos_token_id=256, eos_token_id=257, pad_token_id=1)
    if name == "tiny-neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=2048, bos_token_id=256, eos_token_id=257)
    if name == "tiny-gemma3":  # one key/value head; sliding-window layers with a short window
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=32,
                                max_position_embeddings=2048, bos_token_id=256, eos_token_id=257, pad_token_id=0)
    if name == "tiny-qwen2":  # biases on q/k/v, grouped-query attention
        return Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    if name == "tiny-mistral":  # no sliding window: the prefix cache batches queries
        return MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                             max_position_embeddings=2048, bos_token_id=256, eos_token_id=257)
    if name == "tiny-phi3":  # one fused qkv_proj: rows q | k | v
        return Phi3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          original_max_position_embeddings=2048, bos_token_id=256, eos_token_id=257,
                          pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if name == "tiny-xglm":  # the papers' fairseq-dense family: sinusoidal positions, q scaled after q_proj
        return XGLMConfig(vocab_size=vocab_size, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                          max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          layerdrop=0.0, bos_token_id=256, eos_token_id=257, pad_token_id=257, decoder_start_token_id=256)
    return None


TINY_MODELS = ("tiny-gpt2", "tiny-llama", "tiny-opt", "tiny-neox", "tiny-gemma3", "tiny-qwen2", "tiny-mistral",
               "tiny-phi3", "tiny-xglm")


def build_tiny(name: str, attn: str, seed: int = 0):
    """A tiny random model; `attn`: the kernel under the capture wrapper (sdpa or eager)."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    config = tiny_config(name, len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation(config.model_type, attn))
    return model, tok
