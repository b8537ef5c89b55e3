"""Graph passes: the Pass API, the registry and the manager (see docs/custom-passes.md)."""

from memfit.passes.infra.base import EXACT, Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.manager import PassManager, VerificationError
from memfit.passes.infra.registry import (as_passes, format_pipeline, get_pass, list_passes, parse_pipeline,
                                    register_pass)

__all__ = ["EXACT", "Diagnostic", "Pass", "PassContext", "PassManager", "PassResult", "Promise", "VerificationError",
           "as_passes", "format_pipeline", "get_pass", "list_passes", "parse_pipeline", "register_pass"]
