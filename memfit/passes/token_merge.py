"""Token merging moved to memfit.rewrites.token_merge (a source rewrite run before capture);
this module re-exports its public names for code written against the earlier path."""

from memfit.rewrites.token_merge import (TokenMerge, TokenMergeInfo, apply_token_merging,  # noqa: F401
                                         model_tokens_per_layer, token_merge_pass_info)
