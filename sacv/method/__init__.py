"""The method itself, per batch and in memory: models and their layers, layer outputs and logit
gradients (`activations`), concept vectors, the two maps S_k and S_{k→c}, receptive fields."""
