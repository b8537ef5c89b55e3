"""The example models: each plans from the CLI, and each prediction holds to a measured step."""

import importlib
import os

import pytest
import torch

import memfit
from memfit.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    return importlib.import_module(f"examples.{name}")  # the repository root is on sys.path (conftest)


SMALL = {
    "gpt2_like": dict(batch_size=2, seq_len=64, layers=2, d=64, heads=4, vocab=512),
    "vit_like": dict(batch_size=4, image_size=32, layers=2, d=64, heads=4),
    "resnet_like": dict(batch_size=4, image_size=32, width=8),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_example_prediction_matches_measurement(name):
    mod = load(name)
    model, inputs = mod.make(**SMALL[name])
    p = memfit.plan(model, example_inputs=inputs, optimizer="adamw", loss_fn=mod.loss_fn, symbolic=False)
    m = memfit.measure(model, example_inputs=inputs, optimizer="adamw", loss_fn=mod.loss_fn)
    saved_err = abs(p.categories["saved_activations"] - m.saved_activations) / m.saved_activations
    peak_err = abs(p.peak_bytes - m.peak_bytes) / m.peak_bytes
    assert saved_err <= 0.03, (name, p.categories["saved_activations"], m.saved_activations)
    assert peak_err <= 0.10, (name, p.peak_bytes, m.peak_bytes)
    assert p.categories["optimizer_state"] == m.optimizer_state


def test_resnet_freeze_bn_leaves_batchnorm_in_eval():
    model, _ = load("resnet_like").make(width=8, freeze_bn=True)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns) and model.training


def test_gpt2_small_preset_is_meta_and_has_gpt2_dims():
    model, (idx,) = load("gpt2_like").gpt2_small()
    assert idx.shape == (8, 1024) and idx.device.type == "meta"
    n = sum(p.numel() for p in model.parameters())
    assert 124_000_000 < n < 125_000_000  # GPT-2 small: 124M parameters (tied head)


@pytest.mark.parametrize("spec", ["examples/gpt2_like.py:make", "examples/vit_like.py:make",
                                  "examples/resnet_like.py:make", "examples/hf_models.py:vit"])
def test_cli_plans_every_example(spec, capsys):
    assert main(["plan", os.path.join(ROOT, spec), "--static", "--quiet", "--depth", "1",
                 "-D", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "saved" in out
