"""Third-party quantizers run as peers of vtquant's own methods (optional extras)."""
