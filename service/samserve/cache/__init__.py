"""An image reference to its embedding, once per image across requests and replicas: the embedder, the two-tier
embedding cache with single flight, its record codec and Redis tier, and the image bytes kept beside it."""
