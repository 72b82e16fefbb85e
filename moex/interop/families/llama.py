"""Llama (LlamaForCausalLM): dense SwiGLU blocks, no q/k norms, no biases."""

from moex.interop.families import base


class Llama(base.Family):
  """Every block dense (moex model.first_dense_layers = num_layers)."""

  architecture = "LlamaForCausalLM"
  model_type = "llama"
  neutral = base.NO_BIAS + (("pretraining_tp", 1),)


FAMILY = Llama()
