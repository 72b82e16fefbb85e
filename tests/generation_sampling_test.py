"""moex/generation/sampling.py: greedy, temperature, top-k and top-p on hand-made logits; per-sequence
keys make sampling reproducible and independent of the batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moex.generation import sampling as sample

LOGITS_V = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))  # probabilities


def _draws(s: sample.Sampling, n=4000, seed=0):
  """n samples from LOGITS_V, one sequence each."""
  logits = jnp.broadcast_to(jnp.asarray(LOGITS_V), (n, LOGITS_V.size))
  keys = sample.keys(seed, jnp.arange(n), 0)
  return np.asarray(jax.jit(sample.sample, static_argnums=2)(logits, keys, s))


def test_greedy_is_argmax():
  logits = jnp.asarray([[0.0, 2.0, 1.0], [3.0, -1.0, 2.9]])
  got = sample.sample(logits, sample.keys(0, jnp.arange(2), 0), sample.Sampling())
  np.testing.assert_array_equal(got, [1, 0])


def test_temperature_one_follows_the_softmax():
  freq = np.bincount(_draws(sample.Sampling(temperature=1.0)), minlength=5) / 4000
  np.testing.assert_allclose(freq, np.exp(LOGITS_V), atol=0.03)


def test_low_temperature_sharpens():
  freq = np.bincount(_draws(sample.Sampling(temperature=0.2)), minlength=5) / 4000
  p = np.exp(LOGITS_V / 0.2) / np.exp(LOGITS_V / 0.2).sum()
  np.testing.assert_allclose(freq, p, atol=0.03)
  assert freq[1] > 0.75


def test_top_k_keeps_the_k_most_likely_renormalized():
  freq = np.bincount(_draws(sample.Sampling(temperature=1.0, top_k=2)), minlength=5) / 4000
  np.testing.assert_allclose(freq, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
  # Sorted: 0.4, 0.3, 0.15, ... ; p = 0.6 needs the first two (0.4 < 0.6 <= 0.7).
  freq = np.bincount(_draws(sample.Sampling(temperature=1.0, top_p=0.6)), minlength=5) / 4000
  np.testing.assert_allclose(freq, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.03)
  # A p below the top probability keeps only the top token.
  assert set(_draws(sample.Sampling(temperature=1.0, top_p=0.1), n=200)) == {1}


def test_filtered_by_hand():
  s = sample.Sampling(temperature=2.0, top_k=3, top_p=0.9)
  got = np.asarray(sample.filtered(jnp.asarray([LOGITS_V]), s))[0]
  assert np.isneginf(got[[0, 2]]).all()
  np.testing.assert_allclose(got[[1, 3, 4]], LOGITS_V[[1, 3, 4]] / 2.0, rtol=1e-6)


def test_same_seed_same_tokens_and_each_sequence_its_own_stream():
  s = sample.Sampling(temperature=1.0)
  a, b, c = _draws(s, 64, seed=3), _draws(s, 64, seed=3), _draws(s, 64, seed=4)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # Sequence i's draw depends on (seed, i, step) only, not on the batch around it.
  logits = jnp.broadcast_to(jnp.asarray(LOGITS_V), (3, 5))
  some = sample.sample(logits, sample.keys(3, jnp.asarray([5, 9, 2]), 0), s)
  np.testing.assert_array_equal(some, a[[5, 9, 2]])


@pytest.mark.parametrize("kwargs,flag", [(dict(temperature=-1.0), "--temperature"),
                                         (dict(top_k=-2), "--top_k"),
                                         (dict(top_p=0.0), "--top_p"),
                                         (dict(top_p=1.5), "--top_p")])
def test_bad_values_name_the_flag(kwargs, flag):
  with pytest.raises(ValueError, match=f"^{flag}: "):
    sample.Sampling(**kwargs).check()


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_values_must_be_finite_one_line(name, value):
  """issue 25: every float flag finite (nan passed no comparison-based range check)."""
  with pytest.raises(sample.SamplingError) as e:
    sample.Sampling(**{name: value}).check()
  line = str(e.value)
  assert line.startswith(f"--{name}: must be finite and ") and "\n" not in line, line


def test_every_method_is_a_sampling_field_with_its_default():
  """A sampling method is one METHODS entry and the Sampling field of the same name."""
  fields = {f.name: f.default for f in dataclasses.fields(sample.Sampling)}
  assert fields == {m.name: m.default for m in sample.METHODS}
  for m in sample.METHODS:
    assert type(m.default) is type(fields[m.name]) and m.valid(m.default), m.name
  sample.Sampling().check()  # every default is in range
