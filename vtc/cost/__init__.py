"""What a model costs, counted analytically: FLOPs formulas (FLOPs = 2 MACs), the closed forms of the
papers, the accounting of a built model, and the generation meter of eval.py."""
