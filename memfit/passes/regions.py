"""Module regions and outlining for custom passes (docs/custom-passes.md): re-exported from
their owners, memfit.passes.infra.regions (module_regions) and memfit.ir.outline (outline_region)."""

from memfit.passes.infra.regions import *  # noqa: F401,F403
from memfit.passes.infra.regions import __all__  # noqa: F401
