"""Source-level rewrites: module rewrites that run before capture (token merging).

A graph pass sees one captured graph; a rewrite here changes the nn.Module itself (new
forwards on shared parameters), and the result is captured like any model. Pipelines name
them like passes (`token-merge{r=8},checkpoint`); they always run first.
"""
