"""Data: reading files and hub data sets, labels and splits, tokenised features and their cache, batching."""
