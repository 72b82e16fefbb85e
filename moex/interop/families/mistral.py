"""Mistral (MistralForCausalLM): Llama's blocks; full attention only (sliding_window null)."""

from moex.interop.families import base


class Mistral(base.Family):
  """Every block dense; a sliding window is refused."""

  architecture = "MistralForCausalLM"
  model_type = "mistral"
  neutral = (("sliding_window", None),)


FAMILY = Mistral()
