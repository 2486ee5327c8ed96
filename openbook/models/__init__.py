"""Models: pure torch/transformers. No Ray, no ranks, no file layout."""
