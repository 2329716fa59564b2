"""saffu-lab: explicitly solved SAFFU language models and structured-FFN transformers."""
