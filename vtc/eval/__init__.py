"""eval.py's task: a trained run or a released LLaVA directory evaluated on the synthetic test split or
a LLaVA benchmark, optionally with a test-time compressor; and the export of a trained run."""
