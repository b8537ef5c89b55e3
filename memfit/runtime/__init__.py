"""Runtime pieces the passes call into: autograd-friendly functions and Functions."""
