"""The engine: requests (checks, handles, detokenization, sampling), the scheduler and continuous batching, the
adapter pool, fault isolation, chat templates, and the step functions that drive the model layer."""
