"""The batch contract between the data code and the model code.

Data code knows nothing of models but the tokenizer and the image geometry; the model knows
nothing of files. A collated batch is a plain dict with these keys:

Training / teacher-forced (every split):
    input_ids       LongTensor [B, T]  right-padded with the tokenizer's pad id. A sample with
                                        an image holds exactly one ``image_token_id`` where the
                                        visual tokens go; a text-only sample holds none.
    labels          LongTensor [B, T]  unshifted targets (HF convention): the token id on the
                                        assistant's tokens, IGNORE_INDEX everywhere else
                                        (prompt, padding, the image placeholder).
    attention_mask  LongTensor [B, T]  1 on real tokens, 0 on padding.
    pixel_values    FloatTensor [N, 3, H, W]  normalised images of the samples that have one,
                                        in batch order (N <= B; N == 0 gives shape [0, 3, H, W]).
    image_index     LongTensor [B]     row of ``pixel_values`` for each sample, -1 if none.

Generation (val / test splits; absent from train batches):
    gen_input_ids       LongTensor [B, P]  the prompt up to and including the assistant role
                                            marker (what the model continues), right-padded.
    gen_attention_mask  LongTensor [B, P]
    answers             list[str]          reference answer of the last assistant turn.
    question_types      list[str]          e.g. "cell", "count"; "" when unknown.

Always:
    ids             list[str]          sample ids (the ``__key__`` of the shard member).
"""

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

TRAIN_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "image_index", "ids")
GEN_KEYS = ("gen_input_ids", "gen_attention_mask", "answers", "question_types")
