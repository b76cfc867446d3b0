"""The Pixtral model library: config, text and vision model, image pipeline, tokenizers, prompts,
weights, and the EXL2 format (pixtral/exl2/)."""
