"""Where bytes live and how they are laid out: fsspec locations and options (`storage`), the run
directory, its lock, the Zarr store, image files, device JPEG decoding, the records the stages hand
each other (`handoffs`), package versions."""
