"""The intermediate representation: capture (nn.Module to torch.fx GraphModule with
FakeTensor metadata), the one module wrapper (OptimizedModule), the one outliner, and the
fx helpers every stage shares."""
