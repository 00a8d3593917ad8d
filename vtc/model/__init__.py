"""Model parts: vision encoder, LLM layer loop, projector, splicing, the sequence state, compile. The
assembled model is vtc.lmm, above the compressors."""
