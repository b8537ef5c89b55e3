"""Runtime pieces the rewritten graphs call: autograd Functions, checkpointed regions, fused ops."""
