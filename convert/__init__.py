"""Mistral-native checkpoints to the HF Llava layout: weights, config, tokenizer and chat template."""
