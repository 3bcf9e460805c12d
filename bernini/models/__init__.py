"""Model code: the Wan2.2 DiT with packed multi-source sequences, its RoPE, text encoder and VAE."""
