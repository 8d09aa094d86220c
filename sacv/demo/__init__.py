"""The embedded demo: generated textures and scenes."""
