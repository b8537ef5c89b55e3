"""Autograd Functions and hooks that passes insert into rewritten graphs."""
