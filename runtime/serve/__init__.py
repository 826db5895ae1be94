"""Serving sdrt bundles: the batcher, the HTTP app, and the Triton and Ray Serve adapters."""
