"""One module per separately trained component: transformer, autoencoder, t5, clip."""
