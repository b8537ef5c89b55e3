"""The memfit command, run as a user would (subprocess) where exit codes and stderr matter."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "memfit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    f = d / "tiny.py"
    f.write_text(textwrap.dedent("""
        import torch
        def make(batch_size=16):
            m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
            return m, (torch.randn(batch_size, 32),)
        def bare():
            return torch.nn.Sequential(torch.nn.Linear(32, 8))
        def broken():
            raise RuntimeError("boom")
    """))
    return str(f)


def test_plan_prints_table(factory):
    r = run("plan", f"{factory}:make", "--budget", "1MiB", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "peak" in r.stdout and "budget" in r.stdout and "largest batch within budget" in r.stdout


def test_plan_one_fsdp_rank(factory):
    out = {}
    for world in ("1", "4"):
        r = run("plan", f"{factory}:make", "--static", "--json", "--quiet", "--optimizer", "adamw",
                "--data-parallel", "fsdp", "--world-size", world)
        assert r.returncode == 0, r.stderr
        out[world] = json.loads(r.stdout)
    assert any("FSDP2 over 4 ranks" in n for n in out["4"]["notes"])
    # the two Linears are the units: a quarter of each kept, their state a quarter too
    assert out["4"]["categories"]["optimizer_state"] < 0.3 * out["1"]["categories"]["optimizer_state"]


def test_plan_json_and_factory_args(factory):
    r = run("plan", f"{factory}:make", "--json", "-D", "batch_size=8", "--optimizer", "sgd", "--quiet")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["symbols"]["B"] == 8 and d["optimizer"] == "sgd" and d["peak_bytes"] > 0


def test_plan_with_input_spec(factory):
    r = run("plan", f"{factory}:bare", "--input", "float32[5,32]", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "B=5" in r.stdout


def test_plot_writes_png(factory, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.png"
    r = run("plan", f"{factory}:make", "--plot", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_lines_on_stderr(factory):
    r = run("plan", f"{factory}:make")
    assert "memfit: capturing" in r.stderr and r.returncode == 0


@pytest.mark.parametrize("args,needle", [
    (["plan", "{f}:make", "--budget", "6 parsecs"], "malformed budget"),
    (["plan", "{f}:make", "--budget-of", "reserved"], "does not run on a CUDA device"),
    (["plan", "/nonexistent/model.py:make"], "no such file"),
    (["plan", "{f}:nosuch"], "no callable 'nosuch'"),
    (["plan", "{f}"], "expected FILE.py:FACTORY"),
    (["plan", "{f}:bare"], "--input"),
    (["plan", "{f}:broken"], "boom"),
    (["plan", "{f}:bare", "--input", "float32[a,b]"], "malformed --input"),
])
def test_bad_input_is_one_line_exit_2(factory, args, needle):
    r = run(*[a.replace("{f}", factory) for a in args], "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("memfit: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback(factory):
    r = run("plan", f"{factory}:make", "--budget", "6 parsecs", "--debug", "--quiet")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.fixture(scope="module")
def unruly(tmp_path_factory):
    f = tmp_path_factory.mktemp("unruly") / "unruly.py"
    f.write_text(textwrap.dedent("""
        import sys, torch
        class DataDependent(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.l = torch.nn.Linear(4, 4)
            def forward(self, x):
                return self.l(x) if x.sum() > 0 else x       # no capture road follows this
        def make():
            return DataDependent(), (torch.randn(2, 4),)
        def exits():
            sys.exit(3)
    """))
    return str(f)


def test_factories_come_from_files_unless_module_is_asked_for(factory):
    r = run("plan", "os:getcwd", "--quiet")
    assert r.returncode == 2 and "not a .py file" in r.stderr and "--module" in r.stderr
    r = run("plan", "examples.gpt2_like:make", "--module", "--static", "--quiet", "-D", "batch_size=2",
            "-D", "layers=1", "-D", "d=32", "-D", "heads=2", "-D", "vocab=64", "-D", "seq_len=16")
    assert r.returncode == 0, r.stderr


def test_exiting_factory_huge_input_and_failed_capture_are_one_line(unruly):
    r = run("plan", f"{unruly}:exits", "--quiet")
    assert r.returncode == 2 and r.stderr.strip() == "memfit: error: calling exits() exited (status 3)"
    r = run("plan", f"{unruly}:make", "--input", "float32[99999999,99999999]", "--quiet")
    assert r.returncode == 2 and "more than half of this machine's memory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("plan", f"{unruly}:make", "--quiet")
    assert r.returncode == 2 and "cannot capture DataDependent" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr       # no torch graph dumps, no log lines


def test_measure_prints_nothing(capfd):
    import torch

    import memfit
    memfit.measure(torch.nn.Linear(8, 8), example_inputs=(torch.randn(2, 8),))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_plan_over_budget_may_choose_the_optimizers_states(tmp_path):
    """`--optimizer adamw` stands for the AdamW instance a loop holds: where recompute cannot
    meet the budget (an MLP whose activations are under 1% of its step), the plan shows the
    8-bit states optimize would give that optimizer."""
    pytest.importorskip("torchao")
    f = tmp_path / "wide.py"
    f.write_text(textwrap.dedent("""
        import torch
        def make(batch_size=32):
            m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.GELU(), torch.nn.Linear(1024, 256))
            return m, (torch.randn(batch_size, 256),)
    """))
    r = run("plan", f"{f}:make", "--budget", "80%", "--optimizer", "adamw", "--static", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["fits"] and plan["optimizer"] == "AdamW8bit", plan["decisions"]
    assert [d["action"] for d in plan["decisions"] if d["target"] == "(optimizer state)"] == ["optimizer-8bit"]
    assert r.stderr == ""
