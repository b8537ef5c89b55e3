"""Pass infrastructure: the Pass API (base), the registry, the manager and its verify mode,
the graph printer and module regions. Passes themselves live one per file in memfit/passes/."""
