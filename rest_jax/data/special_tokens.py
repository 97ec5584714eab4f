"""The ids every rest_jax vocabulary reserves, as T5 and T5X do: pad = 0, EOS = 1, unk = 2, no BOS.

Batches, Grow stores, samplers and losses rely on them; `rest_jax.data.vocab` builds vocabularies that keep
them (a Hugging Face tokenizer's ids are renumbered to). A module of its own so that the model, the sampler and
the train step import without the vocabulary libraries (seqio, TensorFlow): an accelerator image may lack them.
"""

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
