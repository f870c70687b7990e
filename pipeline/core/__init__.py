"""The method and the model: M²PT's config, prompt hooks and adapter files (m2pt), the other tuning methods
(methods), base-model loaders and checks (models), the Vicuna chat template (chat), the training forward (step)
and its FLOP count (flops)."""
