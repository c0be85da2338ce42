"""Models: finding pretrained checkpoints, building task models, saved model folders, predicting, BigBird."""
