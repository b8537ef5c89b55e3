# RUN: %python %s | filecheck %s
# Negative tests: what a user sees for an unknown pass, a bad option, a malformed pipeline,
# a broken pass under verify mode, and from `memfit opt` on the command line.
import contextlib
import io
from dataclasses import dataclass
from typing import ClassVar

import torch

from memfit.cli import main
from memfit.errors import PassError
from memfit.passes import Pass, PassResult, parse_pipeline, register_pass
from memfit.testing import expect_error, opt_text, run
from tests.models import MLP


@run
def test_unknown_pass_error():
    with expect_error(PassError):
        parse_pipeline("outline,no-such-pass{x=1}")
# CHECK-LABEL: TEST: test_unknown_pass_error
# CHECK-NEXT: ERROR: PassError: unknown pass 'no-such-pass' (registered: {{.*}}outline{{.*}})


@run
def test_bad_options_error():
    for text in ["outline{colour=red}", "outline{min_nodes=two}", "outline{min_nodes=0}",
                 "outline{pattern}", "outline{pattern=a}}", "outline,,outline"]:
        with expect_error(PassError):
            parse_pipeline(text)
# CHECK-LABEL: TEST: test_bad_options_error
# CHECK-NEXT: ERROR: PassError: pass 'outline' has no option 'colour' (options: pattern, min_nodes)
# CHECK-NEXT: ERROR: PassError: option 'min_nodes' of pass 'outline': expected int, got 'two'
# CHECK-NEXT: ERROR: PassError: pass 'outline': min_nodes must be at least 1, got 0
# CHECK-NEXT: ERROR: PassError: malformed option 'pattern' of pass 'outline' (expected key=value)
# CHECK-NEXT: ERROR: PassError: malformed pipeline at column 19: expected ',' before '}'
# CHECK-NEXT: ERROR: PassError: malformed pipeline at column 9


@register_pass
@dataclass(frozen=True)
class DoubleOutput(Pass):
    """Claims to be exact, doubles the first output."""
    name: ClassVar[str] = "lit-double-output"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = out.args[0][0]
        with gm.graph.inserting_before(out):
            m = gm.graph.call_function(torch.mul, (first, 2.0))
        m.meta["val"] = first.meta["val"]
        out.args = ((m,) + tuple(out.args[0][1:]),)
        return PassResult(gm, modified=True)


@run
def test_verify_names_the_broken_pass_error():
    with expect_error(PassError):
        opt_text(MLP(16, 32, 4), torch.randn(8, 16), "outline{pattern=fc1,min_nodes=1},lit-double-output",
                 method="symbolic_trace", verify=True)
# CHECK-LABEL: TEST: test_verify_names_the_broken_pass_error
# CHECK-NEXT: ERROR: VerificationError: verification failed after pass 'lit-double-output'
# CHECK-SAME: (passes run before: outline{pattern=fc1,min_nodes=1})
# CHECK-SAME: output 0 differs: relative error 1.000e+00 > rtol 1e-05


@run
def test_cli_one_line_errors():
    for argv in (["--passes", "nope"], ["--passes", "outline{min_nodes=-1}"], ["--input", "float32[4,x]"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["opt", "tests.models:MLP", "--module", "--input", "float32[4,64]", "--quiet", *argv])
        print(f"exit {code}: {err.getvalue().strip()}")
# CHECK-LABEL: TEST: test_cli_one_line_errors
# CHECK-NEXT: exit 2: memfit: error: unknown pass 'nope'
# CHECK-NEXT: exit 2: memfit: error: pass 'outline': min_nodes must be at least 1, got -1
# CHECK-NEXT: exit 2: memfit: error: malformed --input 'float32[4,x]'
