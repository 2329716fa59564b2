"""Networks: the GPT baseline, feed-forward blocks (and the SAFFU models)."""
