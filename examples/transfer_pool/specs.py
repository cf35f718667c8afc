"""Adapter shapes and schedules of the transfer pool (ranks and modules vary within each cluster)."""

from examples.demo_pool.build_pool import ATTN_QKVO, ATTN_QV, MLP, AdapterSpec

SPECS: dict[str, AdapterSpec] = {
    "us_long_to_iso": AdapterSpec(8, ATTN_QV, steps=70),
    "eu_long_to_iso": AdapterSpec(4, ATTN_QKVO, steps=70),
    "ordinal_to_iso": AdapterSpec(4, MLP, steps=70),
    "movie_sentiment": AdapterSpec(4, ATTN_QKVO, steps=40),
    "product_sentiment": AdapterSpec(8, ATTN_QV, steps=40),
    "restaurant_sentiment": AdapterSpec(4, MLP, steps=40),
    "email_in_sentence": AdapterSpec(8, ATTN_QKVO, steps=50),
    "email_in_signature": AdapterSpec(4, MLP, steps=50),
    "email_in_record": AdapterSpec(8, ATTN_QV, steps=50),
    "words_to_digits": AdapterSpec(8, ATTN_QV, steps=60),
    "quantity_to_digits": AdapterSpec(4, MLP, steps=60),
    "price_to_digits": AdapterSpec(8, ATTN_QKVO, steps=60),
}
