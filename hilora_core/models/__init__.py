"""Locating and loading the models the router and the engine need: the base LLM and the sentence embedder."""
