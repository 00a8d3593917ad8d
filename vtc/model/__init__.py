"""Model components: vision encoder, projector, language model, splicing, the assembled LMM."""
