# RUN: %python %s | filecheck %s
# Text pipelines parse to pass objects and print back in canonical form (defaults dropped).
from dataclasses import dataclass
from typing import ClassVar

from memfit.passes import Pass, PassResult, format_pipeline, parse_pipeline, register_pass
from memfit.testing import run


@register_pass
@dataclass(frozen=True)
class Knobs(Pass):
    """A pass with one option of every text-convertible type."""
    name: ClassVar[str] = "lit-knobs"
    count: int = 1
    ratio: float = 0.5
    label: str = "x"
    enabled: bool = True
    names: tuple[str, ...] = ()
    limit: int | None = None

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


def show(text):
    passes = parse_pipeline(text)
    canon = format_pipeline(passes)
    again = format_pipeline(parse_pipeline(canon))
    print(f"{text!r} -> {canon!r} stable={canon == again}")
    for p in passes:
        print(f"  {p!r}")


@run
def test_defaults_are_dropped():
    show("lit-knobs")
    show("lit-knobs{count=1,ratio=0.5}")
    show("  lit-knobs { } ")
# CHECK-LABEL: TEST: test_defaults_are_dropped
# CHECK-NEXT: 'lit-knobs' -> 'lit-knobs' stable=True
# CHECK-NEXT: Knobs(count=1, ratio=0.5, label='x', enabled=True, names=(), limit=None)
# CHECK-NEXT: 'lit-knobs{count=1,ratio=0.5}' -> 'lit-knobs' stable=True
# CHECK: '  lit-knobs { } ' -> 'lit-knobs' stable=True


@run
def test_typed_options():
    show("lit-knobs{count=3,ratio=0.25,label=blocks.*,enabled=no,names=a:b:c,limit=7}")
    show("lit-knobs{limit=none,enabled=ON}")
# CHECK-LABEL: TEST: test_typed_options
# CHECK-NEXT: -> 'lit-knobs{count=3,ratio=0.25,label=blocks.*,enabled=false,names=a:b:c,limit=7}' stable=True
# CHECK-NEXT: Knobs(count=3, ratio=0.25, label='blocks.*', enabled=False, names=('a', 'b', 'c'), limit=7)
# CHECK-NEXT: 'lit-knobs{limit=none,enabled=ON}' -> 'lit-knobs' stable=True


@run
def test_sequences_and_builtins():
    show("outline{pattern=layers.*},lit-knobs{count=2},outline")
# CHECK-LABEL: TEST: test_sequences_and_builtins
# CHECK-NEXT: -> 'outline{pattern=layers.*},lit-knobs{count=2},outline' stable=True
# CHECK-NEXT: Outline(pattern='layers.*', min_nodes=2)
# CHECK-NEXT: Knobs(count=2,
# CHECK-NEXT: Outline(pattern='*', min_nodes=2)
