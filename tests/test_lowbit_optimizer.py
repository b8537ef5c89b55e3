"""Optimizer states in 8 and 4 bits (memfit/runtime/lowbit.py, torchao's low-bit Adam; techniques
"optimizer_8bit" and "optimizer_4bit"): the conversion keeps every hyper-parameter and the
user's optimizer intact, the update is torchao's own and within a stated error of fp32 AdamW,
the cost model's stand-in predicts the measured step, the planner picks them only where exact
techniques cannot fit, and it says so.

torchao compiles its step once per parameter shape (seconds each on a CPU), so every test here
uses the same few shapes."""

import copy
import subprocess
import sys

import pytest
import torch

import memfit
from memfit.runtime import lowbit
from tests.models import ce, decay_groups as groups, gelu_mlp

pytest.importorskip("torchao", reason="optional extra memfit[optim]")

pytestmark = pytest.mark.slow


def mlp():
    return gelu_mlp(256, 1024, 256)


X, Y = torch.randn(32, 256), torch.randint(0, 256, (32,))


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 256, generator=g), torch.randint(0, 256, (32,), generator=g)) for _ in range(n)]


def run(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = ce(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("make,cls", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-7), "AdamW8bit"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01), "Adam8bit"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True), "AdamW8bit"),
], ids=["adamw", "adam", "adam-decoupled"])
def test_conversion_keeps_groups_and_hyper_parameters(make, cls):
    model = mlp()
    opt = make(groups(model))
    new = lowbit.to_low_bit(opt, 8)
    assert type(new).__name__ == cls and lowbit.bits_of(new) == 8
    assert len(new.param_groups) == 2
    for g, ng in zip(opt.param_groups, new.param_groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in ng["params"]]
        assert float(ng["lr"]) == pytest.approx(g["lr"])
        assert isinstance(ng["lr"], torch.Tensor)        # torchao's step reads a tensor lr
        for k in ("betas", "eps", "weight_decay"):
            assert ng[k] == pytest.approx(g[k])


def test_same_update_as_torchao_and_within_stated_error_of_fp32():
    """memfit's conversion steps exactly as torchao's own AdamW8bit built by hand; against fp32
    AdamW the loss after 10 steps differs by under 1% and each parameter's total update by
    under 5% of its norm (block-wise 8-bit moments)."""
    ao = lowbit.torchao_optim()
    data = batches(10)
    m_fp32, m_ao, m_ours = mlp(), mlp(), mlp()
    l_fp32 = run(m_fp32, torch.optim.AdamW(groups(m_fp32), lr=1e-3), data)
    hand = ao.AdamW8bit(groups(m_ao), lr=1e-3)
    l_ao = run(m_ao, hand, data)
    user = torch.optim.AdamW(groups(m_ours), lr=1e-3)
    l_ours = run(m_ours, lowbit.to_low_bit(user, 8), data)
    assert l_ours == l_ao
    assert all(torch.equal(a, b) for a, b in zip(m_ao.parameters(), m_ours.parameters()))
    assert abs(l_ours[-1] - l_fp32[-1]) / abs(l_fp32[-1]) < 0.01
    start = mlp()
    for p0, p, q in zip(start.parameters(), m_fp32.parameters(), m_ours.parameters()):
        ref_update = (p - p0).norm()
        assert (q - p).norm() < 0.05 * ref_update + 1e-7
    assert not user.state                          # the user's optimizer never stepped


def test_four_bit_within_stated_error_of_fp32():
    """4-bit moments (blocks of 128): the loss after 10 steps within 2% of fp32 AdamW."""
    data = batches(10)
    m_fp32, m_4 = mlp(), mlp()
    l_fp32 = run(m_fp32, torch.optim.AdamW(m_fp32.parameters(), lr=1e-3), data)
    l_4 = run(m_4, lowbit.to_low_bit(torch.optim.AdamW(m_4.parameters(), lr=1e-3), 4), data)
    assert l_4 != l_fp32                           # it is a different update ...
    assert abs(l_4[-1] - l_fp32[-1]) / abs(l_fp32[-1]) < 0.02     # ... within the stated error


def test_existing_state_is_carried_over_quantized():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run(model, opt, batches(2))
    before = copy.deepcopy(opt.state_dict())
    new = lowbit.to_low_bit(opt, 8)
    for p in model.parameters():
        st, ns = opt.state[p], new.state[p]
        assert float(ns["step"]) == float(st["step"]) == 2.0
        for k in ("exp_avg", "exp_avg_sq"):
            q = ns[k].dequantize() if hasattr(ns[k], "dequantize") else ns[k]
            ref = st[k]
            assert (q - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-12
    after = opt.state_dict()                      # the user's optimizer is untouched
    assert all(torch.equal(before["state"][i][k], after["state"][i][k])
               for i in before["state"] for k in before["state"][i] if torch.is_tensor(before["state"][i][k]))


@pytest.mark.parametrize("make,why", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1), "not torch.optim.Adam or AdamW"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3, maximize=True), "maximize"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-3, amsgrad=True), "amsgrad"),
])
def test_refusals_name_the_cause(make, why):
    opt = make(mlp().parameters())
    assert why in lowbit.why_not(opt)
    with pytest.raises(ValueError, match=why):
        lowbit.to_low_bit(opt, 8)


# ----------------------------------------------------------------------------- cost model

@pytest.mark.parametrize("bits", [8, 4])
def test_prediction_matches_measurement(bits):
    """The stand-in's states and probed step scratch against one real step (profiler)."""
    model = mlp()
    opt = lowbit.to_low_bit(torch.optim.AdamW(model.parameters(), lr=1e-3), bits)
    p = memfit.plan(model, example_inputs=(X,), example_targets=(Y,), loss_fn=ce, optimizer=opt, symbolic=False)
    m = memfit.measure(model, example_inputs=(X,), example_targets=(Y,), loss_fn=ce, optimizer=opt)
    assert abs(p.peak_bytes - m.peak_bytes) <= 0.005 * m.peak_bytes, (p.peak_bytes, m.peak_bytes)
    assert p.categories["optimizer_state"] == m.optimizer_state, (p.categories, m.optimizer_state)


def test_state_bytes_are_torchaos_own():
    from memfit.cost_models.allocations import inner_tensors
    from memfit.cost_models.lowbit import state_parts

    model = mlp()
    for bits in (8, 4):
        opt = lowbit.to_low_bit(torch.optim.AdamW(model.parameters(), lr=1e-3), bits)
        for p in model.parameters():
            real = opt._new_buffer(p, True)
            assert sum(state_parts(opt, p, True)) == sum(t.nbytes for t in inner_tensors(real))
        big, small = model[2].weight, model[2].bias     # quantized; fp32 (under 4096 elements)
        assert sum(state_parts(opt, big, True)) < big.numel() * (2 if bits == 8 else 1)
        assert sum(state_parts(opt, small, True)) == small.numel() * 4


def test_scratch_line_predicts_a_third_size():
    """The probe fits a line through two sizes; a third, measured for real, lies on it."""
    from memfit.cost_models import lowbit as cm

    opt = lowbit.to_low_bit(torch.optim.AdamW(mlp().parameters(), lr=1e-3), 8)
    p = torch.zeros(32, 1024)
    predicted = cm.step_scratch_bytes(opt, p)
    measured = cm._measure(opt, (32, 1024), torch.float32, torch.device("cpu"))
    assert predicted > 0
    assert abs(predicted - measured) <= 0.01 * measured + 64


# ----------------------------------------------------------------------------- planning

def test_chosen_only_where_exact_techniques_cannot_fit_and_said():
    model = mlp()
    state = copy.deepcopy(model.state_dict())
    user = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # at a batch of 2048 the activations are most of the step: recompute meets 90% (exact), and
    # the states stay fp32
    xb, yb = torch.randn(2048, 256), torch.randint(0, 256, (2048,))
    loose, same = memfit.optimize(model, "90%", example_inputs=(xb,), example_targets=(yb,), loss_fn=ce,
                                  optimizer=user)
    assert type(same) is torch.optim.AdamW
    assert not any(d.action.startswith("optimizer-") for d in loose.memfit_plan.decisions)
    assert any(d.action == "recompute" for d in loose.memfit_plan.decisions), loose.memfit_plan.decisions
    # at a batch of 32 they are under 1% of it: recompute cannot meet 80%, 8-bit states can

    om, opt = memfit.optimize(model, "80%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce,
                              optimizer=user)
    assert type(opt).__name__ == "AdamW8bit"
    d = [d for d in om.memfit_plan.decisions if d.target == "(optimizer state)"]
    assert len(d) == 1 and d[0].action == "optimizer-8bit" and "approximate" in d[0].detail
    assert om.memfit_plan.optimizer == "AdamW8bit"
    m = memfit.measure(om, example_inputs=(X,), example_targets=(Y,), loss_fn=ce, optimizer=opt)
    assert m.peak_bytes <= om.memfit_plan.budget_bytes
    # the user's optimizer and model are as they were
    assert not user.state and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # training with what optimize returned: within 1% of fp32 AdamW on the user's model
    data = batches(10)
    ref = copy.deepcopy(mlp())
    l_ref = run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3), data)
    l_ours = run(om, opt, data)
    assert abs(l_ours[-1] - l_ref[-1]) / abs(l_ref[-1]) < 0.01


def test_not_allowed_or_not_installed_refuses_with_the_cause(monkeypatch):
    from memfit.planning.techniques import DEFAULT_TECHNIQUES

    exact_and_quantize = [t for t in DEFAULT_TECHNIQUES if not t.startswith("optimizer_")]
    with pytest.raises(memfit.BudgetError, match="optimizer_8bit"):
        memfit.optimize(mlp(), "80%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce,
                        optimizer=torch.optim.AdamW(mlp().parameters()), techniques=exact_and_quantize)

    def missing():
        raise ImportError("low-bit optimizer states need torchao: pip install 'memfit[optim]'")
    monkeypatch.setattr(lowbit, "torchao_optim", missing)
    model = mlp()
    with pytest.raises(memfit.BudgetError, match=r"memfit\[optim\]"):
        memfit.optimize(model, "80%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce,
                        optimizer=torch.optim.AdamW(model.parameters()))


def test_with_step_in_backward():
    from memfit.planning.techniques import DEFAULT_TECHNIQUES
    from memfit.runtime.optim import StepInBackward

    model = mlp()
    om, opt = memfit.optimize(model, "75%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce,
                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                              techniques=DEFAULT_TECHNIQUES + ("step_in_backward",))
    assert isinstance(opt, StepInBackward) and opt.inner_class.__name__ == "AdamW8bit"
    assert om.memfit_plan.optimizer == "AdamW8bit (step in backward)"
    m = memfit.measure(om, example_inputs=(X,), example_targets=(Y,), loss_fn=ce, optimizer=opt)
    assert abs(m.peak_bytes - om.memfit_plan.peak_bytes) <= 0.005 * m.peak_bytes
    assert m.peak_bytes <= om.memfit_plan.budget_bytes
    data = batches(10)
    ref = mlp()
    l_ref = run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3), data)
    l_ours = run(om, opt, data)
    assert abs(l_ours[-1] - l_ref[-1]) / abs(l_ref[-1]) < 0.01


def test_importing_torchao_through_memfit_prints_nothing():
    code = ("import memfit, torch\n"
            "import torchao.optim\n"
            "from memfit.runtime.lowbit import torchao_optim\n"
            "torchao_optim()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


@pytest.mark.transformers
def test_hugging_face_gpt2_with_labels_and_adamw():
    """A model memfit did not write: GPT-2 from a config (random weights), its own loss from
    labels=, a real AdamW with decay groups; the plan takes 8-bit states, the measured step
    meets the budget and matches the prediction, and training follows fp32 AdamW."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=1024,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 1024, (2, 64))
    kw = dict(input_ids=ids, labels=ids)

    def adamw(m):
        decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in m.named_parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-3)

    om, opt = memfit.optimize(model, "70%", example_kwargs=kw, optimizer=adamw(model))
    assert type(opt).__name__ == "AdamW8bit", om.memfit_plan.decisions
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in adamw(model).param_groups]
    m = memfit.measure(om, example_kwargs=kw, optimizer=opt)
    assert m.peak_bytes <= om.memfit_plan.budget_bytes
    assert abs(m.peak_bytes - om.memfit_plan.peak_bytes) <= 0.01 * m.peak_bytes, (m.peak_bytes,
                                                                                  om.memfit_plan.peak_bytes)
    opt_ref = adamw(ref)
    for _ in range(5):
        for mod, o in ((om, opt), (ref, opt_ref)):
            o.zero_grad()
            mod(**kw).loss.backward()
            o.step()
    with torch.no_grad():
        l_ours, l_ref = om(**kw).loss.item(), ref(**kw).loss.item()
    assert abs(l_ours - l_ref) / l_ref < 0.01, (l_ours, l_ref)


def test_inputs_planned_again_keep_the_optimizer_the_user_holds():
    """A module planned again for other inputs cannot hand back another optimizer: the user
    trains with the one optimize returned. At B=2048, 56 MiB is met by recompute with fp32
    AdamW; at B=2600 only 8-bit states would meet it, so the new plan refuses rather than
    price a state the user's optimizer does not have."""
    model = mlp()
    x, y = torch.randn(2048, 256), torch.randint(0, 256, (2048,))
    om, opt = memfit.optimize(model, "56MiB", example_inputs=(x,), example_targets=(y,), loss_fn=ce,
                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert type(opt) is torch.optim.AdamW
    om(x)
    with pytest.raises(memfit.BudgetError, match="cannot be met") as ei:
        om(torch.randn(2600, 256))
    msg = str(ei.value)
    assert msg.startswith("planning again for inputs (2600, 256)")
    assert "does not use optimizer_8bit, optimizer_4bit" in msg


def test_row_chunks_fall_on_blocks():
    assert lowbit.row_chunks((1024, 1024), 256, True) is None            # 1M elements: whole
    spans = lowbit.row_chunks((4096, 257), 256, True)                     # rows of 257: 256-row units
    assert spans == [(0, 3840), (3840, 4096)]
    assert all(s * 257 % 256 == 0 for s, _ in spans)
    assert lowbit.row_chunks((3000, 1000), 256, False) == [(0, 1048), (1048, 2096), (2096, 3000)]
    assert lowbit.row_chunks((5_000_000,), 256, True)[0] == (0, 1 << 20)
    assert lowbit.row_chunks((), 256, True) is None


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_step_is_torchaos_update_with_one_chunks_scratch(bits):
    """A parameter over CHUNK_ELEMENTS (4096 x 768: three chunks of 1365-1366 rows) steps bit
    for bit as torchao's own optimizer does, with a third of its scratch, as predicted."""
    from memfit.cost_models.allocations import cpu_allocations, profiler_peak
    from memfit.cost_models.lowbit import step_scratch_bytes

    ao = lowbit.torchao_optim()
    torch.manual_seed(0)
    a, b = torch.nn.Linear(768, 4096, bias=False), torch.nn.Linear(768, 4096, bias=False)
    b.load_state_dict(a.state_dict())
    theirs = getattr(ao, f"AdamW{bits}bit")(a.parameters(), lr=1e-3)
    ours = lowbit.to_low_bit(torch.optim.AdamW(b.parameters(), lr=1e-3), bits)
    assert isinstance(ours, type(theirs)) and ours.memfit_chunk_elements == lowbit.CHUNK_ELEMENTS
    x = torch.randn(16, 768)
    peaks = {}
    for i in range(3):
        for m, o in ((a, theirs), (b, ours)):
            o.zero_grad()
            m(x).square().mean().backward()
            with cpu_allocations() as prof:
                o.step()
            peaks[o is ours] = profiler_peak(prof)
    assert torch.equal(a.weight, b.weight)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(theirs.state[a.weight][k].dequantize(), ours.state[b.weight][k].dequantize())
    assert peaks[True] < 0.4 * peaks[False], peaks
    # equal to the byte on this project's Xeon at 1 and 2 threads; 0.5% leaves room for
    # thread-timing noise in the allocator's events (a few KiB on CI's 2 threads elsewhere)
    assert abs(peaks[True] - step_scratch_bytes(ours, b.weight)) <= 0.005 * peaks[True], peaks
    assert abs(peaks[False] - step_scratch_bytes(theirs, a.weight)) <= 0.005 * peaks[False], peaks
