"""Converters: other projects' checkpoints into unclip model sets.

A converter maps names and shapes onto our own networks, configured to match (no second copy of any
network lives here), and writes a normal model set: safetensors with the config in the metadata, strict
loading, a model card. `karlo` reads Hugging Face diffusers' Karlo folders; `verify` runs a converted set's
networks against the originals (diffusers and transformers, when installed).
"""
