"""text_generation package."""
