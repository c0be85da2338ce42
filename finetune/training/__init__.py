"""Training: the loop (train.py), its optimizer, precision, resumable state, evaluation and what follows a run."""
