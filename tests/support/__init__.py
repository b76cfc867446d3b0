"""Test-only fixtures: small random Pixtral checkpoints and uniform-bit EXL2 tiers."""
