"""Fifteen transformers model families, small configs, random weights, no downloads: each
factory returns (model, example_inputs, example_kwargs) with `labels=` (or `return_loss=`) in
the kwargs, so the model computes its own loss (`output.loss`, memfit's default loss).

    memfit plan examples/hf_families.py:t5 --optimizer adamw
    memfit plan examples/hf_families.py:whisper -D batch_size=4

FAMILIES names them all; the suite plans, optimizes and measures each (tests/test_families.py)
and tools/bench/predict_vs_measure.py tabulates them. Attention is the library's "eager"
implementation where a model has several, so attention matrices are explicit.
"""

from __future__ import annotations

import torch

from examples.hf_models import _tf

VOCAB = 512


def _ids(b: int, t: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t))


def _lm(model_cls, cfg, batch_size, seq_len):
    model = model_cls(cfg).train()
    ids = _ids(batch_size, seq_len)
    return model, (ids,), {"labels": ids.clone()}


def _images(model_cls, cfg, batch_size, image_size, num_labels=10, channels=3):
    model = model_cls(cfg).train()
    x = torch.randn(batch_size, channels, image_size, image_size)
    return model, (x,), {"labels": torch.randint(0, num_labels, (batch_size,))}


def gpt2(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                        eos_token_id=0, use_cache=False, attn_implementation="eager")
    return _lm(tf.GPT2LMHeadModel, cfg, batch_size, seq_len)


def llama(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, use_cache=False,
                         attn_implementation="eager", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _lm(tf.LlamaForCausalLM, cfg, batch_size, seq_len)


def phi(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.PhiConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                       vocab_size=VOCAB, max_position_embeddings=128, use_cache=False, attn_implementation="eager",
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _lm(tf.PhiForCausalLM, cfg, batch_size, seq_len)


def mamba(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.MambaConfig(num_hidden_layers=2, hidden_size=64, state_size=8, vocab_size=VOCAB, use_cache=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _lm(tf.MambaForCausalLM, cfg, batch_size, seq_len)


def bert(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=VOCAB, max_position_embeddings=128, attn_implementation="eager")
    return _lm(tf.BertForMaskedLM, cfg, batch_size, seq_len)


def t5(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False,
                      decoder_start_token_id=0, pad_token_id=0)
    return _lm(tf.T5ForConditionalGeneration, cfg, batch_size, seq_len)


def bart(batch_size: int = 2, seq_len: int = 64):
    tf = _tf()
    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=128, use_cache=False, decoder_start_token_id=2, pad_token_id=1,
                        attn_implementation="eager")
    return _lm(tf.BartForConditionalGeneration, cfg, batch_size, seq_len)


def whisper(batch_size: int = 2, frames: int = 64, seq_len: int = 16):
    tf = _tf()
    cfg = tf.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=frames // 2,
                           max_target_positions=64, use_cache=False, decoder_start_token_id=1, pad_token_id=0,
                           attn_implementation="eager")
    model = tf.WhisperForConditionalGeneration(cfg).train()
    feats = torch.randn(batch_size, cfg.num_mel_bins, frames)
    return model, (feats,), {"labels": _ids(batch_size, seq_len)}


def vit(batch_size: int = 4, image_size: int = 32):
    tf = _tf()
    cfg = tf.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                       image_size=image_size, patch_size=8, num_labels=10, attn_implementation="eager")
    return _images(tf.ViTForImageClassification, cfg, batch_size, image_size)


def swin(batch_size: int = 2, image_size: int = 32):
    tf = _tf()
    cfg = tf.SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                        window_size=4, num_labels=10)
    return _images(tf.SwinForImageClassification, cfg, batch_size, image_size)


def segformer(batch_size: int = 2, image_size: int = 32):
    tf = _tf()
    cfg = tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], num_labels=10)
    return _images(tf.SegformerForImageClassification, cfg, batch_size, image_size)


def mobilevit(batch_size: int = 2, image_size: int = 64):
    tf = _tf()
    cfg = tf.MobileViTConfig(image_size=image_size, hidden_sizes=[32, 48, 64],
                             neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10)
    return _images(tf.MobileViTForImageClassification, cfg, batch_size, image_size)


def resnet(batch_size: int = 4, image_size: int = 32):
    tf = _tf()
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=10)
    return _images(tf.ResNetForImageClassification, cfg, batch_size, image_size)


def convnext(batch_size: int = 4, image_size: int = 32):
    tf = _tf()
    cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    return _images(tf.ConvNextForImageClassification, cfg, batch_size, image_size)


def clip(batch_size: int = 4, seq_len: int = 16, image_size: int = 32):
    tf = _tf()
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = tf.CLIPModel(cfg).train()
    return (model, (_ids(batch_size, seq_len),),
            {"pixel_values": torch.randn(batch_size, 3, image_size, image_size), "return_loss": True})


FAMILIES = ("gpt2", "llama", "phi", "mamba", "bert", "t5", "bart", "whisper", "vit", "swin", "segformer",
            "mobilevit", "resnet", "convnext", "clip")
