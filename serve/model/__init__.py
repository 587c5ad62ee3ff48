"""The model: the base's own HF modeling code run by the runner with hotswap's attention over the KV cache,
its linears wrapped by the multi-adapter layer, and the engine-wide context and logit kinds."""
