"""Generation: the engine (compiled prefill and decode step over the KV cache), sampling,
a workdir's model loaded for it, and text in / text out (moex.generate's work)."""
