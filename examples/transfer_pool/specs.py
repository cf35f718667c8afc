"""Adapter shapes and schedules of the transfer pool (ranks and modules vary within each cluster)."""

from examples.demo_pool.build_pool import ATTN_QKVO, ATTN_QV, MLP, TrainingSpec

SPECS: dict[str, TrainingSpec] = {
    "us_long_to_iso": TrainingSpec(8, ATTN_QV, steps=70),
    "eu_long_to_iso": TrainingSpec(4, ATTN_QKVO, steps=70),
    "ordinal_to_iso": TrainingSpec(4, MLP, steps=70),
    "movie_sentiment": TrainingSpec(4, ATTN_QKVO, steps=40),
    "product_sentiment": TrainingSpec(8, ATTN_QV, steps=40),
    "restaurant_sentiment": TrainingSpec(4, MLP, steps=40),
    "email_in_sentence": TrainingSpec(8, ATTN_QKVO, steps=50),
    "email_in_signature": TrainingSpec(4, MLP, steps=50),
    "email_in_record": TrainingSpec(8, ATTN_QV, steps=50),
    "words_to_digits": TrainingSpec(8, ATTN_QV, steps=60),
    "quantity_to_digits": TrainingSpec(4, MLP, steps=60),
    "price_to_digits": TrainingSpec(8, ATTN_QKVO, steps=60),
    "us_slash_to_iso": TrainingSpec(4, MLP, steps=70),
    "eu_dot_to_iso": TrainingSpec(8, ATTN_QV, steps=70),
    "compact_to_iso": TrainingSpec(4, ATTN_QKVO, steps=70),
    "post_sentiment": TrainingSpec(8, ATTN_QV, steps=40),
    "chat_sentiment": TrainingSpec(4, MLP, steps=40),
    "feedback_sentiment": TrainingSpec(4, ATTN_QKVO, steps=40),
    "year_to_digits": TrainingSpec(4, ATTN_QKVO, steps=60),
    "ordinal_to_digits": TrainingSpec(8, ATTN_QV, steps=60),
    "mixed_to_digits": TrainingSpec(4, MLP, steps=60),
}
