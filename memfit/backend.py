"""The torch.compile backend under its documented name: `memfit.backend.make_backend`,
`last_report()`, ... The code lives in memfit/compile/ (options, partitioner, quantized
saves); this module re-exports its public names."""

from memfit.compile import (BACKEND_NAME, BackendError, BackendOptions, BackendReport, MemfitPartitioner,  # noqa: F401
                            PartitionReport, clear_reports, last_report, make_backend, measure_partition,
                            memfit_backend, pin_rng_ops, register, reports)
