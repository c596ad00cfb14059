"""Tiny random models for tests: real Hugging Face architectures built from configs, with a
byte-level tokenizer (label words become several tokens, which exercises multi-token scoring)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

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
    return None


TINY_MODELS = ("tiny-gpt2", "tiny-llama", "tiny-opt", "tiny-neox", "tiny-gemma3")


def build_tiny(name: str, attn: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    config = tiny_config(name, len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model, tok
