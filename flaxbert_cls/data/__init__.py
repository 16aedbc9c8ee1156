"""Data: from a task's files or dataset to tokenized splits and global batches.

Owns the task registry (`tasks`), file formats (`readers`, and as streams `streaming`),
label parsing and label maps (`labels`), Hugging Face `datasets` / TFDS splits (`sources`), tokenization with its cache
(`tokenization`), class weights from the training labels (`class_weights`) and the batching
of examples and documents into padded, sharded batches (`batching`). It is the lowest layer
above `errors` and `workdir`: it imports nothing else of the package (`config` imports it).
"""
