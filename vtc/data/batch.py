"""The batch contract between the data code and the model code.

Data code knows nothing of models but the tokenizer and the image geometry; the model knows
nothing of files. A collated batch is a plain dict with these keys:

Training / teacher-forced (every split):
    input_ids       LongTensor [B, T]  right-padded with the tokenizer's pad id. A sample holds
                                        one ``image_token_id`` per visual item, where that
                                        item's tokens go (its k-th placeholder takes its k-th
                                        item); a text-only sample holds none.
    labels          LongTensor [B, T]  unshifted targets (HF convention): the token id on the
                                        assistant's tokens, IGNORE_INDEX everywhere else
                                        (prompt, padding, the image placeholder).
    attention_mask  LongTensor [B, T]  1 on real tokens, 0 on padding.
    pixel_values    FloatTensor [N, 3, H, W]  every frame of every visual item, normalised, in
                                        batch order (an image is one frame; a video's frames in
                                        time order; N == 0 gives shape [0, 3, H, W]).
    visual_items    LongTensor [M, 4]  per visual item, in batch order and within a sample in
                                        placeholder order: (sample, first row of pixel_values,
                                        frames, kind) with kind ITEM_IMAGE or ITEM_VIDEO.
                    A batch built by hand where every sample has at most one image may give
                    ``image_index`` LongTensor [B] instead (row of pixel_values, -1 for none);
                    ``vtc.data.collate.visual_items`` turns it into ``visual_items``.

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
# A video's place in the text; tokenised as IMAGE_PLACEHOLDER (docs/video.md).
VIDEO_PLACEHOLDER = "<video>"

ITEM_IMAGE, ITEM_VIDEO = 0, 1  # visual_items[:, 3]

TRAIN_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "visual_items", "ids")
GEN_KEYS = ("gen_input_ids", "gen_attention_mask", "answers", "question_types")
