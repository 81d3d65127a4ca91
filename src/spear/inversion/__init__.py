"""Layer inversion as a pipeline of steps (docs/algorithm.md, "The attack step by step")."""
