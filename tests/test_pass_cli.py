"""`memfit opt` and `memfit passes` through memfit.cli.main (one subprocess test for the
console entry)."""

import subprocess
import sys
import textwrap

import pytest

from memfit.cli import main

MODEL = "tests.models:MLP"      # an installed module's factory: --module (INPUT below)
INPUT = ["--module", "--input", "float32[4,64]", "--quiet"]


def test_passes_lists_builtin_and_loaded(tmp_path, capsys):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar
        from memfit.passes import Pass, PassResult, Promise, register_pass

        @register_pass
        @dataclass(frozen=True)
        class Frob(Pass):
            """Frobnicate the graph (test plugin).

            More text that is not shown."""
            name: ClassVar[str] = "test-frob"
            promise: ClassVar[Promise] = Promise("approximate", cosine=0.9)
            level: int = 3
            tags: tuple[str, ...] = ()

            def run(self, gm, ctx):
                return PassResult(gm, modified=False)
    '''))
    assert main(["passes", "--load", str(plugin)]) == 0
    out = capsys.readouterr().out
    assert "outline  [exact]  Outline every module whose path matches `pattern`" in out
    assert "    pattern: str = *" in out
    assert "test-frob  [approximate]  Frobnicate the graph (test plugin)." in out
    assert "    level: int = 3" in out and "More text" not in out
    assert '    tags: tuple[str, ...] = ""' in out


def test_opt_prints_graph_stats_and_peaks(capsys):
    assert main(["opt", MODEL, *INPUT, "--passes", "outline{pattern=fc*,min_nodes=1}", "--verify"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "graph @MLP {"
    assert "  %fc1_region = @fc1_region(%x) : f32[4, 256] module=fc1" in lines
    assert "graph @fc2_region {" in lines
    assert "// pipeline: outline{pattern=fc*,min_nodes=1}" in lines
    assert "// stats: outline.outlined=3" in lines
    peak = next(line for line in lines if line.startswith("// predicted peak:"))
    assert peak.endswith("(+0.0%)")  # outlining alone changes no byte
    assert "// verified: 1 pass(es) kept their promises on the example inputs" in lines


def test_opt_print_after_all_and_diagnostics(capsys):
    assert main(["opt", MODEL, *INPUT, "--passes", "outline{pattern=fc1},outline{pattern=nothing}",
                 "--print-after-all", "--no-analysis"]) == 0
    out = capsys.readouterr().out
    assert out.count("// -----// IR after outline{pattern=fc1} //----- //") == 1
    assert out.count("// -----// IR after outline{pattern=nothing} //----- //") == 1
    assert "// -----// IR result //----- //" in out
    # fc1 is a single call_module node: under min_nodes=2 it is skipped with a reason
    assert "// info: [outline] at fc1: module fc1 has 1 node(s) < min_nodes=2; left inline" in out
    assert "// warning: [outline]: no module path matches 'nothing'" in out
    assert "saved=" not in out and "predicted peak" not in out


@pytest.mark.parametrize("argv, message", [
    (["--passes", "nope"], "memfit: error: unknown pass 'nope' (registered: "),
    (["--passes", "outline{x=1}"], "memfit: error: pass 'outline' has no option 'x' (options: pattern, min_nodes)"),
    (["--passes", "outline{min_nodes=zero}"], "memfit: error: option 'min_nodes' of pass 'outline': expected int, got 'zero'"),
    (["--passes", "outline{min_nodes=0}"], "memfit: error: pass 'outline': min_nodes must be at least 1, got 0"),
    (["--passes", "outline;x"], "memfit: error: malformed pipeline at column 8"),
    (["--load", "no/such/file.py"], "memfit: error: --load: no such file: no/such/file.py"),
])
def test_opt_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(["opt", MODEL, *INPUT, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_console_entry_runs():
    r = subprocess.run([sys.executable, "-m", "memfit", "passes"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "\noutline  [exact]" in "\n" + r.stdout, r.stderr
