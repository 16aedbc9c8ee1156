"""Serving: a trained run put to use outside the training loop.

Owns batch and streamed prediction (`predict`), export to Hugging Face PyTorch
directories (`export`), int8 ONNX models (`quantize`) and drift monitoring of new data
against a reference (`monitor`). It imports training (to load a run), model, data,
decisions and report's plots; nothing imports it but `cli`.
"""
