"""Hugging Face transformers models built from small configs (random weights, no downloads).

    memfit plan examples/hf_models.py:gpt2
    memfit plan examples/hf_models.py:bert -D seq_len=256

Needs `pip install transformers` (in memfit's `test` extra). Attention is the library's
"eager" implementation, so attention matrices are explicit, as the sdpa-attention pass expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _tf():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("these examples need transformers: pip install 'memfit[test]'") from e
    return transformers


def gpt2(batch_size: int = 2, seq_len: int = 128, layers: int = 2, d: int = 128, heads: int = 4):
    tf = _tf()
    cfg = tf.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=1000, n_positions=max(seq_len, 128), bos_token_id=0, eos_token_id=0,
                        use_cache=False, attn_implementation="eager")
    model = tf.GPT2LMHeadModel(cfg).train()
    return model, (torch.randint(0, cfg.vocab_size, (batch_size, seq_len)),)


def bert(batch_size: int = 2, seq_len: int = 128, layers: int = 2, d: int = 128, heads: int = 4):
    tf = _tf()
    cfg = tf.BertConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                        intermediate_size=4 * d, vocab_size=1000, max_position_embeddings=max(seq_len, 128),
                        attn_implementation="eager")
    model = tf.BertForMaskedLM(cfg).train()
    return model, (torch.randint(0, cfg.vocab_size, (batch_size, seq_len)),)


def vit(batch_size: int = 4, image_size: int = 64, layers: int = 2, d: int = 128, heads: int = 4):
    tf = _tf()
    cfg = tf.ViTConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads, intermediate_size=4 * d,
                       image_size=image_size, patch_size=8, num_labels=10, attn_implementation="eager")
    model = tf.ViTForImageClassification(cfg).train()
    return model, (torch.randn(batch_size, 3, image_size, image_size),)


def resnet(batch_size: int = 4, image_size: int = 64):
    tf = _tf()
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=10)
    model = tf.ResNetForImageClassification(cfg).train()
    return model, (torch.randn(batch_size, 3, image_size, image_size),)


def convnext(batch_size: int = 4, image_size: int = 64):
    tf = _tf()
    cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    model = tf.ConvNextForImageClassification(cfg).train()
    return model, (torch.randn(batch_size, 3, image_size, image_size),)


def loss_fn(output):
    """Mean cross-entropy of the logits against fixed pseudo-labels (0, 1, 2, ...)."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    flat = logits.reshape(-1, logits.shape[-1])
    target = torch.arange(flat.shape[0], device=flat.device) % flat.shape[1]
    return F.cross_entropy(flat, target)
