"""`sdrt bench`: eager diffusers, torch.compile and every sdrt backend, measured the same way.

Imports PyTorch and the sdrt runtime; nothing here is imported until the command runs.
"""
