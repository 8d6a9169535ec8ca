"""Evaluation: perplexity (LLMs) and results rows shared by every command."""
