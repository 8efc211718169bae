"""Output space: probe sets, token log-probs, logits-extrapolation decoding, evaluation."""
