"""Speed benchmarks (CPU-friendly, side by side in one process).

``python -m vtc.bench.compressors [--quick]``: every compressor config's training step against
``none`` and against transformers' own ``LlavaForConditionalGeneration``.
``python -m vtc.bench.curriculum [--quick]``: LLaVolta's stage-wise schedule against constant
``none``. Each writes a markdown table and a JSON record (``--out``). See
``experiments/bench/README.md`` for the setup, the conventions and the verdicts.
"""
