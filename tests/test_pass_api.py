"""The pass API: options and text forms, the lazy registry with entry points, function passes,
and the manager's error reporting and stats."""

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from memfit.ir.capture import capture
from memfit.errors import PassError
from memfit.passes import (Pass, PassContext, PassManager, PassResult, as_passes, format_pipeline, get_pass,
                           list_passes, parse_pipeline, register_pass)
from memfit.passes.infra import registry
from tests.models import MLP


@register_pass
@dataclass(frozen=True)
class Opts(Pass):
    """Options of each type."""
    name: ClassVar[str] = "api-opts"
    n: int = 2
    names: tuple[str, ...] = ("a",)
    flag: bool = False
    cap: float | None = None

    def run(self, gm, ctx):
        return PassResult(gm, modified=False, stats={"seen": 1})


def test_text_round_trip_and_option_docs():
    p = Opts(n=3, names=("x", "y"), flag=True, cap=0.5)
    assert p.to_text() == "api-opts{n=3,names=x:y,flag=true,cap=0.5}"
    assert parse_pipeline(p.to_text()) == [p]
    assert Opts().to_text() == "api-opts"
    assert Opts.option_docs() == [("n", "int", "2"), ("names", "tuple[str, ...]", "a"),
                                  ("flag", "bool", "false"), ("cap", "float | None", "None")]
    with pytest.raises(PassError, match="expected a boolean, got 'maybe'"):
        parse_pipeline("api-opts{flag=maybe}")


def test_function_pass_and_duplicates():
    @register_pass(name="api-fn")
    def api_fn(gm, ctx):
        """Do nothing, in place."""

    cls = get_pass("api-fn")
    assert cls is api_fn and cls.__doc__ == "Do nothing, in place."
    gm = capture(MLP(), (torch.randn(2, 64),)).gm
    assert cls().run(gm, PassContext()).gm is gm

    @dataclass(frozen=True)
    class Other(Pass):
        name: ClassVar[str] = "api-opts"

    with pytest.raises(PassError, match="a pass named 'api-opts' is already registered"):
        register_pass(Other)
    assert get_pass("api-opts") is Opts
    register_pass(Other, replace=True)
    assert get_pass("api-opts") is Other
    register_pass(Opts, replace=True)


def test_entry_points_are_lazy(monkeypatch):
    class EP:
        name, value = "api-from-ep", "memfit.passes.outline:Outline"

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()] if group == "memfit.passes" else [])
    monkeypatch.setitem(registry._BUILTIN, "api-dummy", "memfit.passes.outline:Outline")
    assert get_pass("api-from-ep").__name__ == "Outline"
    monkeypatch.delitem(registry._BUILTIN, "api-from-ep")
    monkeypatch.delitem(registry._BUILTIN, "api-dummy")
    # importing memfit.passes imports no built-in pass module
    code = "import sys, memfit.passes; print('memfit.passes.outline' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    assert "outline" in [c.name for c in list_passes()]


def test_as_passes_mixes_forms():
    ps = as_passes(["api-opts{n=5}", Opts, Opts(flag=True), "outline"])
    assert format_pipeline(ps) == "api-opts{n=5},api-opts,api-opts{flag=true},outline"


def test_manager_reports_failures_with_history_and_sums_stats():
    @dataclass(frozen=True)
    class Boom(Pass):
        name: ClassVar[str] = "api-boom"

        def run(self, gm, ctx):
            raise RuntimeError("kaput")

    @dataclass(frozen=True)
    class Wrong(Pass):
        name: ClassVar[str] = "api-wrong"

        def run(self, gm, ctx):
            return gm

    gm = capture(MLP(), (torch.randn(2, 64),)).gm
    seen = []
    res = PassManager([Opts(), Opts(n=3)], after_pass=lambda p, r: seen.append(p.to_text())).run(gm)
    assert res.stats == {"api-opts.seen": 2} and seen == ["api-opts", "api-opts{n=3}"]
    with pytest.raises(PassError, match=r"pass 'api-boom' failed \(passes run before: api-opts, api-opts\{n=3\}\): "
                                        r"RuntimeError: kaput"):
        PassManager([Opts(), Opts(n=3), Boom()]).run(gm)
    with pytest.raises(PassError, match="pass 'api-wrong' failed .*returned MLP, not a PassResult"):
        PassManager([Wrong()]).run(gm)
