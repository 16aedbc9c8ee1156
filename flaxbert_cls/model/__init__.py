"""Model: the BERT-family encoder, its heads and losses, and how it is partitioned.

Owns the kernels (`ops`: attention, dropout, LayerNorm per backend), the layers with
logical axis names (`layers`: Dense + LoRA, LayerNorm, Embed), the encoder and its heads
(`bert`), the heads' losses (`losses`), window pooling of long documents
(`long_documents`), meshes and logical-axis sharding (`sharding`), TPU chips and
compile-only topologies (`topologies`), and Hugging Face checkpoints in and out (`hf`). It imports only `errors` and `workdir`: no data, training,
decisions or serving module.
"""
